import Logging

/// How `ImageFlattener` writes its output.
public struct FlattenOptions: Sendable, Equatable {
    /// qcow2 (default) or raw.
    public var format: ImageOpener.Format = .qcow2
    /// Compress every data cluster of a qcow2 output with this codec (nil: no compression).
    public var compression: CompressionType?
    /// Cluster size of a qcow2 output.
    public var clusterSize: Int = 65536
    /// Refcount width of a qcow2 output.
    public var refcountBits: Int = 16
    /// Extended L2 entries in a qcow2 output.
    public var extendedL2: Bool = false
    /// fsync the output before returning. Off by default, as qemu-img convert does not
    /// wait for the disk either; the output is complete and consistent in the page cache.
    public var durable: Bool = false
    /// qcow2 output, 64 KiB clusters, 16-bit refcounts, no compression.
    public init() {}
}

/// What `ImageFlattener` wrote.
public struct FlattenResult: Sendable, Equatable {
    /// Guest bytes written as data (before compression).
    public var dataBytes: UInt64
    /// Guest bytes recorded as zeros.
    public var zeroBytes: UInt64
}

/// Writes the guest-visible contents of a chain into one standalone image
/// (like `qemu-img convert`): data extents as data (compressed if asked),
/// zero extents as zeros (metadata only in qcow2), unallocated ranges left
/// unallocated. The output has no backing file and is synced when done.
public enum ImageFlattener {
    /// Flattens `source` (any chain) into a new file at `path` (refused if it exists, unless `overwrite`).
    @discardableResult
    public static func flatten(_ source: GuestImage, to path: String, options: FlattenOptions = FlattenOptions(),
                               overwrite: Bool = false,
                               logger: Logger = Logger(label: "qbackup.flatten", factory: { _ in SwiftLogNoOpLogHandler() }),
                               progress: ((UInt64, UInt64) -> Void)? = nil) throws -> FlattenResult {
        if options.format == .raw {
            let written = try RawExporter.export(source, to: path, overwrite: overwrite, durable: options.durable,
                                                 progress: progress)
            return FlattenResult(dataBytes: written, zeroBytes: 0)
        }
        var create = QCowCreateOptions(size: (source.virtualSize + 511) & ~511)
        create.clusterSize = options.clusterSize
        create.refcountBits = options.refcountBits
        create.extendedL2 = options.extendedL2
        create.compression = options.compression ?? .zlib
        // Written under a temporary name and renamed only when complete (OutputFile).
        let output = try OutputFile(path, overwrite: overwrite, durable: options.durable)
        do {
            let out = try QCowCreator.create(in: output, options: create, logger: logger)
            defer { out.close() }
            // A new file that is useless after a crash anyway: at most one flush at the end,
            // so the engine's ordering barriers are skipped.
            out.syncBarriers = false
            logger.debug("flattening", metadata: ["source": "\(source.filename)", "output": "\(path)"])
            let result = options.compression == nil
                ? try copyExtents(from: source, to: out, progress: progress)
                : try copyCompressed(from: source, to: out, progress: progress)
            if options.durable { try out.flush() } else { try out.commitRefcounts() }
            try output.commit()
            return result
        } catch {
            output.discard()
            throw error
        }
    }

    /// Copies extent by extent, in reads and writes of up to 8 MiB.
    static func copyExtents(from source: GuestImage, to out: QCowFile,
                            progress: ((UInt64, UInt64) -> Void)?) throws -> FlattenResult {
        let total = source.virtualSize
        // Reads here; the output is written (only) on the pipeline's thread.
        let pipeline = WriteBehind(bufferSize: 4 << 20)
        defer { pipeline.drain() }
        var result = FlattenResult(dataBytes: 0, zeroBytes: 0)
        var offset: UInt64 = 0
        while offset < total {
            let status = try source.blockStatus(at: offset, maxLength: min(UInt64(pipeline.bufferSize), total - offset))
            let n = Int(status.length)
            let at = offset
            switch status.kind {
            case .data:
                try pipeline.submit(fill: { buffer in
                    try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: at)
                    return n
                }, write: { data in
                    try out.write(data, at: at)
                })
                result.dataBytes += UInt64(n)
            case .zero:
                try pipeline.submit { try out.writeZeroes(at: at, length: UInt64(n)) }
                result.zeroBytes += UInt64(n)
            case .unallocated:
                break
            }
            offset += UInt64(n)
            progress?(offset, total)
        }
        try pipeline.finish()
        return result
    }

    /// Copies cluster by cluster: a cluster with any data is read whole and
    /// written compressed (an all-zero one is left unallocated, as qemu-img
    /// convert does); a cluster that is all zero extents gets the zero flag.
    static func copyCompressed(from source: GuestImage, to out: QCowFile,
                               progress: ((UInt64, UInt64) -> Void)?) throws -> FlattenResult {
        let total = source.virtualSize
        let cs = UInt64(out.clusterSize)
        var cluster = [UInt8](repeating: 0, count: out.clusterSize)
        var result = FlattenResult(dataBytes: 0, zeroBytes: 0)
        var offset: UInt64 = 0
        while offset < total {
            let end = min(total, offset + cs)
            var hasData = false
            var zeroRanges: [Range<UInt64>] = []
            try source.forEachExtent(in: offset..<end) { status in
                switch status.kind {
                case .data: hasData = true
                case .zero: zeroRanges.append(status.start..<(status.start + status.length))
                case .unallocated: break
                }
            }
            let n = Int(end - offset)
            if hasData {
                try cluster.withUnsafeMutableBytes { raw in
                    let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<n])
                    try source.read(into: part, at: offset)
                    if part.contains(where: { $0 != 0 }) {
                        // The last cluster of a disk that ends mid-cluster is passed short.
                        let length = Int(min(cs, out.virtualSize - offset))
                        if length > n {
                            UnsafeMutableRawBufferPointer(rebasing: raw[n..<length]).initializeMemory(as: UInt8.self, repeating: 0)
                        }
                        try out.writeCompressed(cluster: UnsafeRawBufferPointer(rebasing: raw[0..<length]), at: offset)
                    }
                }
                result.dataBytes += UInt64(n)
            } else {
                for r in zeroRanges {
                    try out.writeZeroes(at: r.lowerBound, length: r.upperBound - r.lowerBound)
                    result.zeroBytes += r.upperBound - r.lowerBound
                }
            }
            offset = end
            progress?(offset, total)
        }
        return result
    }
}
