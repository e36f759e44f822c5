import BackupChain
import FoundationEssentials
import Glibc
import QCowImage

/// An NBD export as a backup source: guest data by NBD reads, allocation from
/// `base:allocation`, changes from `qemu:dirty-bitmap:NAME`.
///
/// The tracking bitmap belongs to whoever runs the export: qbackup never
/// resets it here. `resetBitmap` (which the engine calls once the new layer is
/// durable in the repository) only records that the layer was committed, so
/// the QMP workflow knows to drop `NAME.frozen` rather than merge it back.
public final class NBDSource: BackupSource {
    /// The engine's name of the tracking bitmap, and the exported bitmap that holds its
    /// changes (the same name for `--nbd`; `NAME.frozen` for a QMP fleecing export).
    public struct Tracking: Sendable {
        public var name: String
        public var exported: String
        public init(name: String, exported: String) {
            self.name = name
            self.exported = exported
        }
    }

    public let name: String
    public let uri: String
    public let tracking: Tracking?
    /// What the manifest records as the layer's mode: `.nbd` for an export someone else set
    /// up, `.qmp` when qbackup's own QMP workflow made the fleecing export.
    public let mode: BackupManifest.Mode
    /// The disk as the manifest records it: by default the export's URI (a caller that knows
    /// the disk better names it: `--source-name`, or the image file behind QEMU's node).
    public var disk: BackupManifest.Source
    /// Set when the engine has recorded the layer in the manifest (see the type's comment).
    public private(set) var committed = false
    /// Throws when the export may no longer be of its point in time (the QMP workflow's
    /// fleecing job ended); the engine asks once the layer is written, before recording it.
    public var pointInTimeCheck: (() throws -> Void)?

    let connection: NBDConnection
    /// The last base:allocation reply, so one request answers many `blockStatus` calls.
    private var allocation: [NBDConnection.Extent] = []

    /// Connects to `uri`; with `tracking`, the export must offer that bitmap's context.
    /// `name` is what messages call the disk (default: the URI).
    public init(uri: String, name: String? = nil, tracking: Tracking?, mode: BackupManifest.Mode = .nbd,
                timeout: TimeInterval = 60) throws {
        var contexts = [NBDConnection.allocationContext]
        if let tracking { contexts.append(NBDConnection.dirtyBitmapContext(tracking.exported)) }
        connection = try NBDConnection(uri: uri, contexts: contexts, timeout: timeout)
        self.uri = uri
        self.name = name ?? uri
        self.tracking = tracking
        self.mode = mode
        disk = BackupManifest.Source(kind: .nbd, uri: uri)
        if let tracking, !connection.contexts.contains(NBDConnection.dirtyBitmapContext(tracking.exported)) {
            connection.close()
            throw LiveError(.refused,
                            "\(uri): the export has no bitmap '\(tracking.exported)' (no meta context \(NBDConnection.dirtyBitmapContext(tracking.exported))); export it (qemu-nbd -B \(tracking.exported), or block-export-add with bitmaps) or back up without --bitmap")
        }
    }

    public var virtualSize: UInt64 { connection.size }

    public func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus {
        guard offset < connection.size, maxLength > 0 else {
            throw LiveError(.invalidArgument, "\(uri): block status at \(offset) is past the export's end")
        }
        if !(allocation.first.map({ $0.start <= offset }) ?? false) || !(allocation.last.map({ offset < $0.end }) ?? false) {
            allocation = try connection.blockStatus(NBDConnection.allocationContext, at: offset,
                                                    count: connection.size - offset)
        }
        // Extents are contiguous and sorted: find the one holding offset.
        var lo = 0
        var hi = allocation.count - 1
        while lo < hi {
            let mid = (lo + hi + 1) / 2
            if allocation[mid].start <= offset { lo = mid } else { hi = mid - 1 }
        }
        let extent = allocation[lo]
        let length = min(extent.end - offset, maxLength)
        // base:allocation: bit 0 hole, bit 1 reads as zero. Only a zero extent may be skipped;
        // a hole without the zero bit may read as anything, so it is data.
        let kind: BlockStatus.Kind = extent.flags & 2 == 0 ? .data : extent.flags & 1 == 0 ? .zero : .unallocated
        return BlockStatus(start: offset, length: length, depth: 0, kind: kind, hostOffset: nil, compressed: false)
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try connection.read(into: buffer, at: offset)
    }

    /// The copy plan: read it ahead, so the server is never idle between two of the copy's reads,
    /// into buffers the copier takes over whole.
    public func willRead(_ ranges: [Range<UInt64>], chunk: Int, bufferSize: Int) throws {
        try connection.willRead(ranges, chunk: chunk, bufferSize: bufferSize)
    }

    public func read(exchanging buffer: UnsafeMutableRawBufferPointer, count: Int, at offset: UInt64) throws
        -> UnsafeMutableRawBufferPointer? {
        try connection.read(exchanging: buffer, count: count, at: offset)
    }

    public func bitmapState(_ name: String) throws -> TrackingBitmapState {
        guard let tracking, tracking.name == name else { return .missing }
        return .ready(granularity: connection.minBlock)
    }

    public func forEachDirtyExtent(_ name: String, _ body: (Range<UInt64>) throws -> Void) throws {
        guard let tracking, tracking.name == name else {
            throw LiveError(.refused, "\(uri): bitmap '\(name)' is not exported here")
        }
        try forEachDirtyExtent(exported: tracking.exported, body)
    }

    /// The dirty ranges of exported bitmap `exported`, adjacent ones merged, in order.
    func forEachDirtyExtent(exported: String, _ body: (Range<UInt64>) throws -> Void) throws {
        let context = NBDConnection.dirtyBitmapContext(exported)
        let size = connection.size
        var offset: UInt64 = 0
        var run: Range<UInt64>?
        while offset < size {
            let extents = try connection.blockStatus(context, at: offset, count: size - offset)
            for extent in extents {
                guard extent.flags & 1 != 0 else { continue }
                if let r = run, r.upperBound == extent.start {
                    run = r.lowerBound..<extent.end
                } else {
                    if let r = run { try body(r) }
                    run = extent.start..<extent.end
                }
            }
            guard let last = extents.last, last.end > offset else {
                throw LiveError(.invalidFormat, "\(uri): the server's block status for \(context) at \(offset) made no progress")
            }
            offset = last.end
        }
        if let r = run { try body(r) }
    }

    /// A disk that goes away fails the reads; what remains to ask is `pointInTimeCheck`.
    public func checkUnchanged() throws {
        try pointInTimeCheck?()
    }

    /// The engine calls this once the layer is durable: qbackup resets no bitmap of an NBD export.
    public func resetBitmap(_ name: String) throws {
        committed = true
    }

    public func close() { connection.close() }
}
