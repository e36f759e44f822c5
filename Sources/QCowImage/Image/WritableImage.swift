/// A guest image that takes writes: a qcow2 file opened writable, or a raw file.
public protocol WritableImage: GuestImage {
    /// Writes guest data at `offset`.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes `[offset, offset+length)` read as zeros.
    func writeZeroes(at offset: UInt64, length: UInt64) throws
    /// Makes completed writes durable.
    func flush() throws
}

extension QCowFile: WritableImage {}

extension RawImage: WritableImage {
    /// Writes guest data at `offset` (guest offset = file offset).
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        guard offset <= virtualSize, UInt64(buffer.count) <= virtualSize - offset else {
            throw QCowError(.invalidArgument, "range 0x\(String(offset, radix: 16))+\(buffer.count) lies past the end of the disk (\(virtualSize) bytes)",
                            path: filename)
        }
        try device.write(buffer, at: offset)
    }

    /// Writes zeros (in pieces of at most 1 MiB).
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        let zeros = [UInt8](repeating: 0, count: Int(min(length, 1 << 20)))
        var done: UInt64 = 0
        try zeros.withUnsafeBytes { z in
            while done < length {
                let n = Int(min(UInt64(z.count), length - done))
                try write(UnsafeRawBufferPointer(rebasing: z[0..<n]), at: offset + done)
                done += UInt64(n)
            }
        }
    }

    /// Syncs the file.
    public func flush() throws { try device.sync() }
}
