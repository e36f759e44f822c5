/// A big-endian cursor over bytes read from a file, which knows the file
/// offset of its first byte and the region it decodes, so every failure
/// says where it happened.
public struct ByteReader {
    public let bytes: [UInt8]
    /// File offset of `bytes[0]`.
    public let baseOffset: UInt64
    /// The metadata region for messages ("header", "bitmap directory"...).
    public let region: String
    /// Current position, relative to `bytes`.
    public private(set) var position: Int = 0

    public init(_ bytes: [UInt8], baseOffset: UInt64 = 0, region: String) {
        self.bytes = bytes
        self.baseOffset = baseOffset
        self.region = region
    }

    /// File offset of the current position.
    public var fileOffset: UInt64 { baseOffset + UInt64(position) }
    public var remaining: Int { bytes.count - position }

    private func need(_ count: Int, at pos: Int) throws {
        if count < 0 || pos < 0 || pos > bytes.count || bytes.count - pos < count {
            throw QCowError(.truncated, "\(region) ends before a \(count)-byte field",
                            offset: baseOffset + UInt64(max(pos, 0)), region: region)
        }
    }

    public func u8(at pos: Int) throws -> UInt8 {
        try need(1, at: pos)
        return bytes[pos]
    }
    public func u16(at pos: Int) throws -> UInt16 {
        try need(2, at: pos)
        return UInt16(bytes[pos]) << 8 | UInt16(bytes[pos + 1])
    }
    public func u32(at pos: Int) throws -> UInt32 {
        try need(4, at: pos)
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[pos + i]) }
        return v
    }
    public func u64(at pos: Int) throws -> UInt64 {
        try need(8, at: pos)
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(bytes[pos + i]) }
        return v
    }
    public func bytes(_ count: Int, at pos: Int) throws -> [UInt8] {
        try need(count, at: pos)
        return Array(bytes[pos..<pos + count])
    }

    public mutating func u8() throws -> UInt8 { defer { position += 1 }; return try u8(at: position) }
    public mutating func u16() throws -> UInt16 { defer { position += 2 }; return try u16(at: position) }
    public mutating func u32() throws -> UInt32 { defer { position += 4 }; return try u32(at: position) }
    public mutating func u64() throws -> UInt64 { defer { position += 8 }; return try u64(at: position) }
    public mutating func bytes(_ count: Int) throws -> [UInt8] {
        let b = try bytes(count, at: position)
        position += count
        return b
    }
    public mutating func skip(_ count: Int) throws {
        try need(count, at: position)
        position += count
    }
    /// Advances to the next multiple of `alignment` (relative to the start).
    /// With `allowingEnd`, padding that the data ends inside of is accepted (a
    /// table written at the very end of a file may lack its last padding).
    public mutating func align(to alignment: Int, allowingEnd: Bool = false) throws {
        let pad = (alignment - position % alignment) % alignment
        if allowingEnd && remaining < pad {
            position = bytes.count
            return
        }
        try skip(pad)
    }

    /// An error at the current position in this region.
    public func error(_ code: QCowError.Code, _ message: String, at pos: Int? = nil) -> QCowError {
        QCowError(code, message, offset: baseOffset + UInt64(pos ?? position), region: region)
    }
}

/// The mirror of `ByteReader`: the one place big-endian encoding happens.
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []

    public init(capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { bytes.append(UInt8(v >> 8)); bytes.append(UInt8(v & 0xff)) }
    public mutating func u32(_ v: UInt32) { for s in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8((v >> UInt32(s)) & 0xff)) } }
    public mutating func u64(_ v: UInt64) { for s in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((v >> UInt64(s)) & 0xff)) } }
    public mutating func append(_ b: [UInt8]) { bytes.append(contentsOf: b) }
    public mutating func zeros(_ count: Int) { bytes.append(contentsOf: repeatElement(0, count: count)) }
    /// Pads with zeros to a multiple of `alignment`.
    public mutating func pad(to alignment: Int) { zeros((alignment - bytes.count % alignment) % alignment) }
    /// Overwrites a big-endian u32 at `pos`.
    public mutating func set32(_ v: UInt32, at pos: Int) {
        for i in 0..<4 { bytes[pos + i] = UInt8((v >> UInt32(24 - 8 * i)) & 0xff) }
    }
}

/// Big-endian helpers over raw buffers, for tables held in reusable memory.
public enum BigEndian {
    @inline(__always)
    public static func load64(_ p: UnsafeRawBufferPointer, _ index: Int) -> UInt64 {
        UInt64(bigEndian: p.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self))
    }
    @inline(__always)
    public static func store64(_ p: UnsafeMutableRawBufferPointer, _ index: Int, _ v: UInt64) {
        p.storeBytes(of: v.bigEndian, toByteOffset: index * 8, as: UInt64.self)
    }
}
