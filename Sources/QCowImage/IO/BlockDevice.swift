/// Positional storage that images live on: a file, or memory in tests.
///
/// Reads past the end return fewer bytes; writes past the end grow the device.
public protocol BlockDevice: AnyObject {
    /// A name for messages (the path of a file).
    var name: String { get }
    /// The current size in bytes.
    func size() throws -> UInt64
    /// Reads up to `buffer.count` bytes at `offset`; returns how many were read (fewer only at the end).
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int
    /// Writes all of `buffer` at `offset`.
    func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Sets the size, truncating or extending with zeros.
    func resize(to size: UInt64) throws
    /// Makes every completed write durable.
    func sync() throws
}

extension BlockDevice {
    /// Reads exactly `buffer.count` bytes or throws `truncated`.
    public func readFully(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, region: String) throws {
        let n = try read(into: buffer, at: offset)
        if n < buffer.count {
            throw QCowError(.truncated, "\(region) extends past the end of the file", path: name, offset: offset,
                            region: region)
        }
    }

    /// Reads `count` bytes into a new array, or throws `truncated`.
    public func readBytes(_ count: Int, at offset: UInt64, region: String) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        try bytes.withUnsafeMutableBytes { try readFully(into: $0, at: offset, region: region) }
        return bytes
    }

    /// Reads `buffer.count` bytes; what lies past the end reads as zeros.
    public func readZeroFilling(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let n = try read(into: buffer, at: offset)
        if n < buffer.count {
            UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Writes an array at `offset`.
    public func writeBytes(_ bytes: [UInt8], at offset: UInt64) throws {
        try bytes.withUnsafeBytes { try write($0, at: offset) }
    }
}
