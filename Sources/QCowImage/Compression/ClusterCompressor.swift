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
