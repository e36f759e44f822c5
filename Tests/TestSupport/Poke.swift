import Foundation

/// Writes `bytes` into a file at `offset`, for damaging images at named spec offsets.
public func poke(_ path: String, at offset: UInt64, _ bytes: [UInt8]) throws {
    let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    handle.write(Data(bytes))
}

/// Big-endian bytes of an integer, for `poke`.
public func be<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    withUnsafeBytes(of: value.bigEndian) { Array($0) }
}

/// Reads `count` bytes of a file at `offset`.
public func peek(_ path: String, at offset: UInt64, count: Int) throws -> [UInt8] {
    let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    return Array(handle.readData(ofLength: count))
}
