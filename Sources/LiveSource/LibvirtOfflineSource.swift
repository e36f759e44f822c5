import BackupChain
import BitmapStore
import FoundationEssentials
import QCowImage

/// The disk file of a shut-off libvirt domain as a backup source: guest data through its
/// chain, the changes from the union of its checkpoint bitmaps (named like the checkpoints).
/// The bitmaps are libvirt's: nothing is written to the file, and none is reset.
final class LibvirtOfflineSource: BackupSource {
    let image: GuestImage
    let name: String
    /// The domain's disk (kind libvirt), not the file: the repository follows the domain.
    let disk: BackupManifest.Source
    let bitmaps: [String]
    /// The engine's name of the union.
    let trackingName: String
    /// Why the bitmaps cannot drive an incremental layer (missing, inconsistent, disabled), if so.
    private(set) var problem: String?
    private(set) var committed = false
    private let catalog: BitmapCatalog?

    init(path: String, name: String, disk: BackupManifest.Source, bitmaps: [String], trackingName: String) throws {
        image = try ImageOpener.open(path, writable: false)
        self.name = name
        self.disk = disk
        self.bitmaps = bitmaps
        self.trackingName = trackingName
        guard let file = image as? QCowFile else {
            catalog = nil
            problem = "\(path) is not a qcow2 file, so it holds no checkpoint bitmaps"
            return
        }
        do {
            let catalog = try BitmapCatalog(file: file)
            self.catalog = catalog
            for bitmap in bitmaps {
                guard let entry = catalog.entry(named: bitmap) else {
                    problem = "the bitmap of checkpoint '\(bitmap)' is missing from \(path)"
                    break
                }
                if let why = catalog.inconsistency(of: entry) {
                    problem = "the bitmap of checkpoint '\(bitmap)' in \(path) is inconsistent (\(why))"
                    break
                }
                guard entry.flags.contains(.auto) else {
                    problem = "the bitmap of checkpoint '\(bitmap)' in \(path) is disabled and may have missed writes"
                    break
                }
            }
        } catch {
            image.close()
            throw error
        }
    }

    var virtualSize: UInt64 { image.virtualSize }
    var mode: BackupManifest.Mode { .offline }

    func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus {
        try image.blockStatus(at: offset, maxLength: maxLength)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try image.read(into: buffer, at: offset)
    }

    func bitmapState(_ name: String) throws -> TrackingBitmapState {
        guard name == trackingName, !bitmaps.isEmpty, problem == nil, let catalog, let first = bitmaps.first,
              let entry = catalog.entry(named: first)
        else { return .missing }
        return .ready(granularity: UInt64(1) << UInt64(entry.granularityBits))
    }

    /// The union of the bitmaps' dirty ranges, in order, adjacent ones merged.
    func forEachDirtyExtent(_ name: String, _ body: (Range<UInt64>) throws -> Void) throws {
        guard name == trackingName, let catalog else { return }
        var ranges: [Range<UInt64>] = []
        for bitmap in bitmaps {
            for extent in try catalog.load(bitmap).dirtyExtents() { ranges.append(extent.start..<extent.end) }
        }
        ranges.sort { $0.lowerBound < $1.lowerBound }
        var run: Range<UInt64>?
        for r in ranges {
            if let current = run, r.lowerBound <= current.upperBound {
                run = current.lowerBound..<max(current.upperBound, r.upperBound)
            } else {
                if let current = run { try body(current) }
                run = r
            }
        }
        if let run { try body(run) }
    }

    /// libvirt owns the bitmaps: the engine's reset only notes that the layer was recorded.
    func resetBitmap(_ name: String) throws { committed = true }

    func close() { image.close() }
}
