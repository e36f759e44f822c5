import BitmapStore
import Logging
import QCowImage

/// Commit with dirty tracking: the backing file's enabled bitmaps record every committed range.
enum CommitTracking {
    static func commit(topPath: String, logger: Logger, progress: ((UInt64, UInt64) -> Void)?) throws -> CommitResult {
        try ImageCommitter.commit(topPath: topPath, logger: logger, progress: progress)
    }
}
