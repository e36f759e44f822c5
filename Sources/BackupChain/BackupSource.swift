import QCowImage

/// What the backup engine reads from: the guest-visible disk (block status and
/// positional reads) and the dirty extents of its tracking bitmap. A local
/// qcow2 chain implements it today; an NBD export of a running VM (data via NBD
/// reads, the bitmap via the qemu:dirty-bitmap meta context) can later.
public protocol BackupSource: AnyObject {
    /// A name for messages and the manifest (the image path).
    var name: String { get }
    var virtualSize: UInt64 { get }
    /// Guest-visible status of the disk at `offset` (at least one byte, at most `maxLength`).
    func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus
    /// Reads guest data.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// The state of the tracking bitmap `name`.
    func bitmapState(_ name: String) throws -> TrackingBitmapState
    /// Calls `body` with the dirty byte ranges of bitmap `name`, in order.
    func forEachDirtyExtent(_ name: String, _ body: (Range<UInt64>) throws -> Void) throws
    /// Makes `name` an empty, enabled, consistent bitmap (created if missing), durably.
    func resetBitmap(_ name: String) throws
    /// Throws when the disk changed under the copy so that what was read cannot be trusted
    /// (a file of a local chain truncated or grown by another process). Called after the
    /// layer is written and before it is recorded.
    func checkUnchanged() throws
    /// Releases the source (and its locks).
    func close()
    /// How the data is read, as the layer records it.
    var mode: BackupManifest.Mode { get }
    /// The ranges the copy will read next, in this order (a source over a network may read ahead).
    func willRead(_ ranges: [Range<UInt64>]) throws
}

extension BackupSource {
    public var mode: BackupManifest.Mode { .offline }
}

extension BackupSource {
    /// Sources whose reads fail when the disk goes away (NBD) need no check.
    public func checkUnchanged() throws {}
    /// A local image reads fast enough when asked.
    public func willRead(_ ranges: [Range<UInt64>]) throws {}
}

/// Whether a tracking bitmap can drive an incremental backup.
public enum TrackingBitmapState: Equatable, Sendable {
    case missing
    case disabled
    /// in_use or otherwise inconsistent; the reason says which.
    case inconsistent(String)
    case ready(granularity: UInt64)
}

/// A guest image (any chain) as a backup source without a tracking bitmap:
/// used to fold layers (merge) and to restore to qcow2.
final class GuestImageSource: BackupSource {
    let image: GuestImage
    init(_ image: GuestImage) { self.image = image }
    var name: String { image.filename }
    var virtualSize: UInt64 { image.virtualSize }
    func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus {
        try image.blockStatus(at: offset, maxLength: maxLength)
    }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try image.read(into: buffer, at: offset)
    }
    func bitmapState(_ name: String) throws -> TrackingBitmapState { .missing }
    func forEachDirtyExtent(_ name: String, _ body: (Range<UInt64>) throws -> Void) throws {}
    func resetBitmap(_ name: String) throws {
        throw ChainError(.unsupported, "\(image.filename) has no tracking bitmaps")
    }
    func close() { image.close() }
}
