#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes the guest-visible contents of a chain as a raw file: data extents
/// in large sequential writes, zero and unallocated ranges left as holes.
public enum RawExporter {
    /// Exports `image` to a new raw file at `path` (which must not exist, unless `overwrite`).
    /// Written through `OutputFile`: `path` appears only when complete. With `durable`, the
    /// file and its folder are fsynced (like qemu-img, a plain export does not wait for the
    /// disk). Returns the bytes of data written.
    @discardableResult
    public static func export(_ image: GuestImage, to path: String, overwrite: Bool = false, durable: Bool = false,
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> UInt64 {
        let output = try OutputFile(path, overwrite: overwrite, durable: durable)
        do {
            return try export(image, into: output, progress: progress)
        } catch {
            // Only the temporary file goes; whatever was at `path` stays.
            output.discard()
            throw error
        }
    }

    /// Writes `image` as raw bytes into `output` (new and empty) and commits it; returns the
    /// bytes of data written. On failure the caller discards `output`.
    public static func export(_ image: GuestImage, into output: OutputFile,
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> UInt64 {
        let out = output.device
        defer { out.close() }
        let total = image.virtualSize
        if output.inPlace {
            return try exportInPlace(image, into: output, progress: progress)
        }
        try out.resize(to: total)
        // Reads here, writes on another thread.
        let pipeline = WriteBehind(bufferSize: 4 << 20)
        defer { pipeline.drain() }
        var written: UInt64 = 0
        var offset: UInt64 = 0
        while offset < total {
            let status = try image.blockStatus(at: offset, maxLength: min(UInt64(pipeline.bufferSize), total - offset))
            let n = Int(status.length)
            if status.kind == .data {
                let at = offset
                try pipeline.submit(fill: { buffer in
                    try image.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]), at: at)
                    return n
                }, write: { data in
                    try out.write(data, at: at)
                })
                written += UInt64(n)
            }
            offset += UInt64(n)
            progress?(offset, total)
        }
        try pipeline.finish()
        try output.commit()
        return written
    }

    /// Into OUT itself (stdout or a block device): every byte, zeros too, front to back.
    static func exportInPlace(_ image: GuestImage, into output: OutputFile,
                              progress: ((UInt64, UInt64) -> Void)?) throws -> UInt64 {
        let out = output.device
        let total = image.virtualSize
        if !output.isStream {
            let size = try out.size()
            guard size >= total else {
                throw QCowError(.refused, "the block device holds \(size) bytes, the disk \(total)", path: output.path)
            }
        }
        let chunk = 4 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var written: UInt64 = 0
        var offset: UInt64 = 0
        while offset < total {
            let status = try image.blockStatus(at: offset, maxLength: min(UInt64(chunk), total - offset))
            let n = Int(status.length)
            try buffer.withUnsafeMutableBytes { raw in
                let part = UnsafeMutableRawBufferPointer(rebasing: raw[0..<n])
                if status.kind == .data {
                    try image.read(into: part, at: offset)
                    written += UInt64(n)
                } else {
                    part.initializeMemory(as: UInt8.self, repeating: 0)
                }
                if output.isStream {
                    try writeAll(out, UnsafeRawBufferPointer(part), at: offset)
                } else {
                    try out.write(UnsafeRawBufferPointer(part), at: offset)
                }
            }
            offset += UInt64(n)
            progress?(offset, total)
        }
        try output.commit()
        return written
    }

    /// write(2) until all of `bytes` went out (a pipe takes them in pieces).
    static func writeAll(_ out: FileDevice, _ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < bytes.count {
            let n = write(out.descriptor.rawValue, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw QCowError(.io, "write failed: \(String(cString: strerror(errno)))", path: out.name,
                                offset: offset + UInt64(done))
            }
            done += n
        }
    }
}
