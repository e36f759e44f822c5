import BitmapStore
import FoundationEssentials
import Glibc
import QCowImage

/// A local image (qcow2 with its backing chain) as a backup source: guest data
/// through the chain, the tracking bitmap from the top image's BitmapCatalog.
/// Opened for writing (QEMU's write lock) so no VM or qemu-nbd changes the disk
/// while its data is copied and its bitmap reset; guest data is never written.
final class LocalImageSource: BackupSource {
    let image: GuestImage
    let file: QCowFile
    var catalog: BitmapCatalog

    /// The path the image was named by.
    let path: String

    init(path: String, writable: Bool) throws {
        self.path = path
        image = try ImageOpener.open(path, writable: writable)
        guard let file = image as? QCowFile else {
            image.close()
            throw ChainError(.invalidArgument, "\(path) is a raw image; backups need qcow2 for the tracking bitmap", path: path)
        }
        self.file = file
        do {
            // A backup writes the source's bitmaps: a damaged image is refused before that.
            if writable { try BitmapCatalog.requireUndamaged(file) }
            catalog = try BitmapCatalog(file: file)
            fileSizes = try Self.chainFiles(image).map { ($0, try $0.size()) }
        } catch {
            image.close()
            throw error
        }
    }

    /// Every file the guest data is read from, and its size when the source was opened.
    private var fileSizes: [(BlockDevice, UInt64)] = []

    static func chainFiles(_ image: GuestImage) -> [BlockDevice] {
        image.chain.flatMap { layer -> [BlockDevice] in
            if let q = layer as? QCowFile { return q.dataDevice === q.device ? [q.device] : [q.device, q.dataDevice] }
            if let r = layer as? RawImage { return [r.device] }
            return []
        }
    }

    func checkUnchanged() throws {
        for (device, size) in fileSizes {
            let now = try device.size()
            guard now == size else {
                throw ChainError(.refused, "\(device.name) changed size from \(size) to \(now) bytes during the backup (another process wrote it); the layer was not recorded and the bitmap is unchanged",
                                 path: name)
            }
        }
    }

    var name: String { image.filename }
    var disk: BackupManifest.Source { .localFile(path) }
    var virtualSize: UInt64 { image.virtualSize }

    func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus {
        try image.blockStatus(at: offset, maxLength: maxLength)
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try image.read(into: buffer, at: offset)
    }

    /// A 0-byte disk holds nothing to track and cannot hold a persistent bitmap (its bitmap
    /// table would be empty, which QEMU refuses): nothing can have changed since its last backup
    /// (a disk never shrinks within a repository), so it reads as tracked with no dirty extent.
    private var isEmptyDisk: Bool { image.virtualSize == 0 }

    func bitmapState(_ name: String) throws -> TrackingBitmapState {
        if isEmptyDisk { return .ready(granularity: catalog.defaultGranularity) }
        guard let entry = catalog.entry(named: name) else { return .missing }
        if let why = catalog.inconsistency(of: entry) { return .inconsistent(why.description) }
        guard entry.flags.contains(.auto) else { return .disabled }
        return .ready(granularity: UInt64(1) << UInt64(entry.granularityBits))
    }

    func forEachDirtyExtent(_ name: String, _ body: (Range<UInt64>) throws -> Void) throws {
        if isEmptyDisk { return }
        let bitmap = try catalog.load(name)
        for extent in bitmap.dirtyExtents() { try body(extent.start..<extent.end) }
    }

    func resetBitmap(_ name: String) throws {
        if isEmptyDisk { return }
        try catalog.resetForBackup(name)
    }

    /// A `NAME.frozen` left by a live backup that did not finish (QEMU quit mid-backup, then
    /// the VM stopped) holds changes that no layer has: merged into NAME and removed, as the
    /// live workflow does. A crash between the two steps leaves both, and the next run merges
    /// again (a union). When either bitmap cannot be trusted, both go, so the layer is full.
    func mergeBackFrozen(_ name: String) throws {
        let frozen = name + ".frozen"
        guard let entry = catalog.entry(named: frozen) else { return }
        guard let target = catalog.entry(named: name), catalog.inconsistency(of: entry) == nil,
              catalog.inconsistency(of: target) == nil
        else {
            try catalog.remove(frozen)
            if catalog.entry(named: name) != nil { try catalog.remove(name) }
            return
        }
        try catalog.merge(into: name, sources: [frozen])
        try catalog.remove(frozen)
    }

    func close() { image.close() }
}

extension BitmapCatalog {
    /// After a backup is durable: the tracking bitmap becomes empty and enabled.
    /// A consistent bitmap is cleared (one crash-safe update), then enabled if it
    /// was disabled; an inconsistent one is removed and added anew. A crash between
    /// two steps leaves extra dirty bits or a bitmap that asks for a full backup.
    func resetForBackup(_ name: String) throws {
        guard let entry = entry(named: name) else {
            try add(name)
            return
        }
        if inconsistency(of: entry) != nil {
            let granularity = entry.granularity
            try remove(name)
            try add(name, granularity: granularity, enabled: true)
            return
        }
        try clear(name)
        if !entry.isEnabled { try enable(name) }
    }
}
