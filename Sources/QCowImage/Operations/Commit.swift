import Logging

/// What `ImageCommitter` did.
public struct CommitResult: Sendable, Equatable {
    /// Bytes of guest data copied into the backing file.
    public var dataBytes: UInt64
    /// Bytes made to read as zeros in the backing file.
    public var zeroBytes: UInt64
}

/// Merges a qcow2 image into its backing file, like `qemu-img commit -d`:
/// every range the top image itself allocates (data or zeros) is written
/// into the backing file through the backing file's own write path (so a
/// qcow2 backing file's `writeObserver` sees every range). The top image is
/// left as it was; its guest contents are unchanged by the commit.
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
        let total = top.virtualSize
        let chunk = 8 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var result = CommitResult(dataBytes: 0, zeroBytes: 0)
        var offset: UInt64 = 0
        logger.debug("committing", metadata: ["top": "\(top.filename)", "base": "\(base.filename)"])
        while offset < total {
            let ext = try top.layerStatus(at: offset, maxLength: min(UInt64(chunk), total - offset))
            let n = Int(ext.length)
            switch ext.mapping {
            case .data, .compressed:
                try buffer.withUnsafeMutableBytes { raw in
                    let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<n])
                    try top.read(into: part, at: offset)
                    try base.write(UnsafeRawBufferPointer(part), at: offset)
                }
                result.dataBytes += UInt64(n)
            case .zero:
                try base.writeZeroes(at: offset, length: UInt64(n))
                result.zeroBytes += UInt64(n)
            case .unallocated:
                break
            }
            offset += UInt64(n)
            progress?(offset, total)
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
