import QCowImage

/// What the backup engine reads from: the guest-visible disk (a `GuestReader`: block
/// status and positional reads, which the copier copies from) and the dirty extents of
/// its tracking bitmap. A local qcow2 chain (`LocalImageSource`) and an NBD export of a
/// running VM (`NBDSource`: data via NBD reads, the bitmap via the qemu:dirty-bitmap meta
/// context) implement it.
public protocol BackupSource: GuestReader {
    /// The disk as the manifest records it (the repository's identity): a local image by
    /// its canonical path, an export by its URI or the name given.
    var disk: BackupManifest.Source { get }
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
}

extension BackupSource {
    public var mode: BackupManifest.Mode { .offline }
}

extension BackupSource {
    /// Sources whose reads fail when the disk goes away need no check.
    public func checkUnchanged() throws {}
}

/// Whether a tracking bitmap can drive an incremental backup.
public enum TrackingBitmapState: Equatable, Sendable {
    case missing
    case disabled
    /// in_use or otherwise inconsistent; the reason says which.
    case inconsistent(String)
    case ready(granularity: UInt64)
}
