import Logging

/// What `ImageCommitter` did: guest bytes copied as data, and made to read as zeros.
public typealias CommitResult = CopyResult

/// Merges a qcow2 image into its backing file, like `qemu-img commit -d`, through the
/// copier: every range the top image itself allocates (data or zeros) is written into the
/// backing file through the backing file's own write path (so a qcow2 backing file's
/// `writeObserver` sees every range); what reads as zeros becomes zeros there (the zero
/// policy `hide`: the backing file holds older data). The top image is left as it was;
/// its guest contents are unchanged by the commit.
public enum ImageCommitter {
    /// Commits `top` into `base` (its backing file, opened writable by the caller,
    /// who may install a `writeObserver` on it first). Flushes `base` at the end.
    public static func commit(top: QCowFile, into base: WritableImage,
                              logger: Logger = Logger(label: "qbackup.commit", factory: { _ in SwiftLogNoOpLogHandler() }),
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> CommitResult {
        guard top.virtualSize <= base.virtualSize else {
            throw QCowError(.unsupported, "the backing file (\(base.virtualSize) bytes) is smaller than the image (\(top.virtualSize) bytes); growing it is not supported",
                            path: base.filename)
        }
        logger.debug("committing", metadata: ["top": "\(top.filename)", "base": "\(base.filename)"])
        // The top layer alone, at its own allocation unit: no range is read through to the base.
        let source = LayerReader(top)
        let plan = try CopyPlan.allocated(in: source, grain: UInt64(top.subclusterSize), zeros: true)
        let result = try Copier.copy(plan, from: source, to: .image(base), options: CopyOptions(zeros: .hide)) { done, _ in
            progress?(done, plan.bytes)
        }
        try base.flush()
        logger.debug("committed", metadata: ["data-bytes": "\(result.dataBytes)", "zero-bytes": "\(result.zeroBytes)"])
        return result
    }

    /// Opens the qcow2 image at `path` and its backing file (writable, locked),
    /// and commits. `prepareTop` runs on the opened top image and `prepareBase` on the
    /// opened backing file before any write (BitmapStore refuses damaged metadata there
    /// and installs its observer on the base), `finishBase` after the commit, before the
    /// files are closed.
    public static func commit(topPath path: String,
                              logger: Logger = Logger(label: "qbackup.commit", factory: { _ in SwiftLogNoOpLogHandler() }),
                              progress: ((UInt64, UInt64) -> Void)? = nil,
                              prepareTop: ((QCowFile) throws -> Void)? = nil,
                              prepareBase: ((WritableImage) throws -> Void)? = nil,
                              finishBase: ((WritableImage) throws -> Void)? = nil) throws -> CommitResult {
        let top = try ImageOpener.openQCow(path, logger: logger)
        defer { top.close() }
        try prepareTop?(top)
        guard let opened = try ImageOpener.openBacking(of: top, path: path, writable: true) else {
            throw QCowError(.invalidArgument, "image has no backing file to commit into", path: path, region: "header")
        }
        guard let base = opened as? WritableImage else {
            opened.close()
            throw QCowError(.unsupported, "backing file cannot be written", path: opened.filename)
        }
        top.attachBacking(base)
        try prepareBase?(base)
        let result = try commit(top: top, into: base, logger: logger, progress: progress)
        try finishBase?(base)
        return result
    }
}
