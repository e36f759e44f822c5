import CZlib
import CZstd

/// Compresses and decompresses single qcow2 clusters: raw deflate (no zlib
/// header, as QEMU writes it) or a zstd frame — qcow2.rst, "compression_type".
public struct ClusterCodec: Sendable {
    public let type: CompressionType
    public init(_ type: CompressionType) { self.type = type }

    /// Decompresses `input` into exactly `output.count` bytes. Trailing bytes
    /// after the stream (sector padding) are allowed, as in QEMU.
    public func decompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        switch type {
        case .zlib: return Self.inflateRaw(input, into: output)
        case .zstd: return Self.zstdDecompress(input, into: output)
        }
    }

    /// Compresses one cluster; nil when the result would not be smaller than the input.
    public func compress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        switch type {
        case .zlib: return Self.deflateRaw(input, into: output)
        case .zstd: return Self.zstdCompress(input, into: output)
        }
    }

    // MARK: - zlib

    static func inflateRaw(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        var stream = z_stream()
        guard inflateInit2_(&stream, -15, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return false }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: input.bindMemory(to: Bytef.self).baseAddress)
        stream.avail_in = uInt(input.count)
        stream.next_out = output.bindMemory(to: Bytef.self).baseAddress
        stream.avail_out = uInt(output.count)
        let ret = inflate(&stream, Z_FINISH)
        return (ret == Z_STREAM_END || ret == Z_BUF_ERROR) && stream.avail_out == 0
    }

    static func deflateRaw(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        var stream = z_stream()
        guard deflateInit2_(&stream, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY,
                             ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK
        else { return nil }
        defer { deflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: input.bindMemory(to: Bytef.self).baseAddress)
        stream.avail_in = uInt(input.count)
        stream.next_out = output.bindMemory(to: Bytef.self).baseAddress
        let limit = min(output.count, input.count - 1)
        stream.avail_out = uInt(limit)
        let ret = deflate(&stream, Z_FINISH)
        guard ret == Z_STREAM_END else { return nil }
        return limit - Int(stream.avail_out)
    }

    // MARK: - zstd

    static func zstdDecompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Bool {
        guard let ctx = ZSTD_createDCtx() else { return false }
        defer { ZSTD_freeDCtx(ctx) }
        var inBuf = ZSTD_inBuffer(src: input.baseAddress, size: input.count, pos: 0)
        var outBuf = ZSTD_outBuffer(dst: output.baseAddress, size: output.count, pos: 0)
        while outBuf.pos < outBuf.size {
            let before = (inBuf.pos, outBuf.pos)
            let ret = ZSTD_decompressStream(ctx, &outBuf, &inBuf)
            if ZSTD_isError(ret) != 0 { return false }
            if ret == 0 && outBuf.pos < outBuf.size { return false }  // frame ended early
            if before == (inBuf.pos, outBuf.pos) { return false }  // no progress: input exhausted
        }
        return true
    }

    static func zstdCompress(_ input: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer) -> Int? {
        let limit = min(output.count, input.count - 1)
        let n = ZSTD_compress(output.baseAddress, limit, input.baseAddress, input.count, 3)
        if ZSTD_isError(n) != 0 { return nil }
        return n
    }
}
