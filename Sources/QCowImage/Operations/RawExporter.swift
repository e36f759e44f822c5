#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes the guest-visible contents of a chain as a raw file: data extents
/// in large sequential writes, zero and unallocated ranges left as holes.
public enum RawExporter {
    /// Exports `image` to a new raw file at `path` (which must not exist, unless `overwrite`).
    /// With `durable`, the file is fsynced before returning (like qemu-img, a plain export
    /// does not wait for the disk). Returns the bytes of data written.
    @discardableResult
    public static func export(_ image: GuestImage, to path: String, overwrite: Bool = false, durable: Bool = false,
                              progress: ((UInt64, UInt64) -> Void)? = nil) throws -> UInt64 {
        let out = try FileDevice(creating: path, truncate: overwrite)
        defer { out.close() }
        // A failed export (unreadable or corrupt source) leaves no partial output behind.
        var finished = false
        defer { if !finished { unlink(path) } }
        let total = image.virtualSize
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
        if durable { try out.sync() }
        finished = true
        return written
    }
}
