import CZlib
import CZstd
import Dispatch

/// A reusable compressor for one thread: keeps its deflate stream or zstd
/// context between clusters instead of setting one up per cluster.
public final class ClusterCompressor: @unchecked Sendable {
    public let type: CompressionType
    private var stream = z_stream()
    private var zstd: OpaquePointer?
    private var ready = false

    public init(_ type: CompressionType) {
        self.type = type
        switch type {
        case .zlib:
            ready = deflateInit2_(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                                  ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK
        case .zstd:
            zstd = ZSTD_createCCtx()
            ready = zstd != nil
        }
    }

    deinit {
        switch type {
        case .zlib: if ready { deflateEnd(&stream) }
        case .zstd: if let zstd { ZSTD_freeCCtx(zstd) }
        }
    }

    /// Compresses one cluster as `ClusterCodec.compress` does (same format, same level);
    /// nil when the result would not be smaller than the input.
    public func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        guard ready else { return ClusterCodec(type).compress(input, into: output) }
        let limit = min(output.count, input.count - 1)
        switch type {
        case .zlib:
            guard deflateReset(&stream) == Z_OK else { return nil }
            stream.next_in = UnsafeMutablePointer(mutating: input.bindMemory(to: Bytef.self).baseAddress)
            stream.avail_in = uInt(input.count)
            stream.next_out = output.bindMemory(to: Bytef.self).baseAddress
            stream.avail_out = uInt(limit)
            guard deflate(&stream, Z_FINISH) == Z_STREAM_END else { return nil }
            return limit - Int(stream.avail_out)
        case .zstd:
            let n = ZSTD_compressCCtx(zstd, output.baseAddress, limit, input.baseAddress, input.count, 3)
            return ZSTD_isError(n) != 0 ? nil : n
        }
    }
}

/// Compresses many clusters on every core, keeping one compressor per worker.
public final class ParallelCompressor: @unchecked Sendable {
    public let type: CompressionType
    public let workers: Int
    private let compressors: [ClusterCompressor]

    public init(_ type: CompressionType, workers: Int = max(1, System.coreCount)) {
        self.type = type
        self.workers = workers
        compressors = (0..<workers).map { _ in ClusterCompressor(type) }
    }

    /// Compresses `count` clusters of `clusterSize` bytes from `input` (the last may be
    /// `lastLength` bytes) into slots of `output` (each `clusterSize` bytes); `sizes[i]`
    /// becomes the compressed size, or 0 when cluster i does not compress or `skip(i)`.
    public func compress(_ input: UnsafeRawBufferPointer, clusterSize: Int, count: Int, lastLength: Int,
                         into output: UnsafeMutableRawBufferPointer, sizes: UnsafeMutableBufferPointer<Int>,
                         skip: (Int) -> Bool) {
        let skipped = (0..<count).map(skip)
        nonisolated(unsafe) let input = input
        nonisolated(unsafe) let output = output
        nonisolated(unsafe) let sizes = sizes
        // Clusters dealt round-robin: neighbouring clusters hold similar data (text,
        // random bytes, zeros), so halves of a chunk can take very different times.
        DispatchQueue.concurrentPerform(iterations: workers) { w in
            let compressor = compressors[w]
            for i in stride(from: w, to: count, by: workers) {
                if skipped[i] {
                    sizes[i] = 0
                    continue
                }
                let length = i == count - 1 ? lastLength : clusterSize
                let src = UnsafeRawBufferPointer(rebasing: input[(i * clusterSize)..<(i * clusterSize + length)])
                let dst = UnsafeMutableRawBufferPointer(rebasing: output[(i * clusterSize)..<((i + 1) * clusterSize)])
                sizes[i] = compressor.compress(src, into: dst) ?? 0
            }
        }
    }
}

/// Facts about this machine.
public enum System {
    /// Online processors.
    public static var coreCount: Int {
        #if canImport(Glibc)
        return Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        #else
        return 2
        #endif
    }
}

#if canImport(Glibc)
import Glibc
#endif
