import BitmapStore
import Logging
import QCowImage

/// Commit with dirty tracking: the backing file's enabled bitmaps record every
/// committed range (marked in_use while the commit runs, stored when it ends).
enum CommitTracking {
    static func commit(topPath: String, logger: Logger, progress: ((UInt64, UInt64) -> Void)?) throws -> CommitResult {
        var catalog: BitmapCatalog?
        return try ImageCommitter.commit(
            topPath: topPath, logger: logger, progress: progress,
            // Data read through damaged metadata would be committed wrong: refused like a damaged base.
            prepareTop: { try BitmapCatalog.requireUndamaged($0) },
            prepareBase: { base in
                guard let file = base as? QCowFile else { return }
                try BitmapCatalog.requireUndamaged(file)
                let tracked = try BitmapCatalog(file: file)
                try tracked.startTracking()
                catalog = tracked
            },
            finishBase: { _ in try catalog?.close() })
    }
}
