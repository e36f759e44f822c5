import Logging

/// How `ImageFlattener` writes its output.
public struct FlattenOptions: Sendable, Equatable {
    /// qcow2 (default) or raw.
    public var format: ImageOpener.Format = .qcow2
    /// Compress every data cluster of a qcow2 output with this codec (nil: no compression).
    public var compression: CompressionType?
    /// Cluster size of a qcow2 output (and the unit in which a raw output's zeros become holes).
    public var clusterSize: Int = 65536
    /// Refcount width of a qcow2 output.
    public var refcountBits: Int = 16
    /// Extended L2 entries in a qcow2 output.
    public var extendedL2: Bool = false
    /// fsync the output before returning. Off by default, as qemu-img convert does not
    /// wait for the disk either; the output is complete and consistent in the page cache.
    public var durable: Bool = false
    /// Threads that compress (default: every core).
    public var workers = max(1, System.coreCount)
    /// qcow2 output, 64 KiB clusters, 16-bit refcounts, no compression.
    public init() {}
}

/// What `ImageFlattener` wrote.
public typealias FlattenResult = CopyResult

/// Writes the guest-visible contents of a chain into one standalone image (like
/// `qemu-img convert`) through the copier: the chain's data, cluster by cluster; clusters
/// that read as zeros, zero extents and unallocated ranges stay unallocated (holes in a
/// raw file), as a new image without a backing file reads zeros there anyway. `flatten`
/// and `restore` (either format) are this one function, so they lay a point out alike.
public enum ImageFlattener {
    /// Flattens `source` (any chain) into a new file at `path` (refused if it exists, unless `overwrite`).
    @discardableResult
    public static func flatten(_ source: GuestImage, to path: String, options: FlattenOptions = FlattenOptions(),
                               overwrite: Bool = false,
                               logger: Logger = Logger(label: "qbackup.flatten", factory: { _ in SwiftLogNoOpLogHandler() }),
                               progress: ((UInt64, UInt64) -> Void)? = nil) throws -> FlattenResult {
        // Written under a temporary name and renamed only when complete (OutputFile).
        let output = try OutputFile(path, overwrite: overwrite, durable: options.durable)
        do {
            return try flatten(source, into: output, options: options, logger: logger, progress: progress)
        } catch {
            output.discard()
            throw error
        }
    }

    /// Flattens `source` into `output` (new and empty, or a block device or stream written in
    /// place: raw only, every byte) and commits it. On failure the caller discards `output`.
    @discardableResult
    public static func flatten(_ source: GuestImage, into output: OutputFile, options: FlattenOptions = FlattenOptions(),
                               logger: Logger = Logger(label: "qbackup.flatten", factory: { _ in SwiftLogNoOpLogHandler() }),
                               progress: ((UInt64, UInt64) -> Void)? = nil) throws -> FlattenResult {
        logger.debug("flattening", metadata: ["source": "\(source.filename)", "output": "\(output.path)"])
        let grain = UInt64(options.clusterSize)
        var copy = CopyOptions(zeros: .skip, compress: options.compression != nil)
        copy.workers = options.workers
        if options.format == .raw {
            let device = output.device
            defer { device.close() }
            guard !output.inPlace else {
                // A block device or stdout: every byte, zeros too, front to back.
                if !output.isStream {
                    let size = try device.size()
                    guard size >= source.virtualSize else {
                        throw QCowError(.refused, "the block device holds \(size) bytes, the disk \(source.virtualSize)",
                                        path: output.path)
                    }
                }
                copy.zeros = .write
                let result = try Copier.copy(.whole(size: source.virtualSize, grain: grain), from: source,
                                             to: .raw(device, stream: output.isStream), options: copy, progress: progress)
                try output.commit()
                return result
            }
            try device.resize(to: source.virtualSize)
            let result = try Copier.copy(try .data(of: source, grain: grain), from: source,
                                         to: .raw(device, stream: false), options: copy, progress: progress)
            try output.commit()
            return result
        }
        guard !output.inPlace else {
            throw QCowError(.invalidArgument, "stdout and block devices take a raw image: use --format raw", path: output.path)
        }
        var create = QCowCreateOptions(size: (source.virtualSize + 511) & ~511)
        create.clusterSize = options.clusterSize
        create.refcountBits = options.refcountBits
        create.extendedL2 = options.extendedL2
        create.compression = options.compression ?? .zlib
        let out = try QCowCreator.create(in: output, options: create, logger: logger)
        defer { out.close() }
        // A new file that is useless after a crash anyway: at most one flush at the end,
        // so the engine's ordering barriers are skipped.
        out.syncBarriers = false
        let result = try Copier.copy(try .data(of: source, grain: grain), from: source, to: .image(out), options: copy,
                                     progress: progress)
        if options.durable { try out.flush() } else { try out.writeBack() }
        try output.commit()
        return result
    }
}
