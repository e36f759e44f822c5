import QCowImage

/// One bitmap table entry — qcow2.rst, "Bitmap table": bits 9-55 hold the
/// offset of a data cluster; with no offset, bit 0 says all zeros (0) or all ones (1).
public struct BitmapTableEntry: Equatable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Bits 9-55: the data cluster offset.
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    /// Bits 1-8 and 56-63 must be zero.
    public static let reservedMask: UInt64 = 0xff00_0000_0000_01fe
    /// Bit 0 with no offset: the cluster reads as all ones.
    public static let allOnesFlag: UInt64 = 1

    /// An entry for an empty region: no data cluster, reads as zeros.
    public static let allZeros = BitmapTableEntry(rawValue: 0)
    /// An entry for a full region: no data cluster, reads as ones.
    public static let allOnes = BitmapTableEntry(rawValue: allOnesFlag)
    /// An entry pointing at a data cluster.
    public static func data(at offset: UInt64) -> BitmapTableEntry { BitmapTableEntry(rawValue: offset & offsetMask) }

    /// What the entry says about its cluster of bitmap data.
    public enum Kind: Equatable, Sendable {
        case allZeros
        case allOnes
        case data(UInt64)
    }

    public var kind: Kind {
        let offset = rawValue & Self.offsetMask
        if offset != 0 { return .data(offset) }
        return rawValue & Self.allOnesFlag != 0 ? .allOnes : .allZeros
    }

    /// The data cluster offset, or nil.
    public var dataOffset: UInt64? {
        let offset = rawValue & Self.offsetMask
        return offset == 0 ? nil : offset
    }
}

/// A bitmap table: the data cluster of each `clusterSize * 8` bits of the bitmap.
///
/// On disk: `bitmap_table_size` big-endian u64 entries at `bitmap_table_offset`,
/// contiguous — qcow2.rst, "Bitmap table".
public struct BitmapTable: Equatable, Sendable {
    /// Where the table is (0 for a table not yet written).
    public var offset: UInt64
    public var entries: [BitmapTableEntry]

    public init(offset: UInt64 = 0, entries: [BitmapTableEntry]) {
        self.offset = offset
        self.entries = entries
    }

    /// Bytes the table takes on disk.
    public var byteCount: Int { entries.count * 8 }

    /// The table's bytes.
    public func encoded() -> [UInt8] {
        var writer = ByteWriter(capacity: byteCount)
        for entry in entries { writer.u64(entry.rawValue) }
        return writer.bytes
    }

    /// Decodes `bytes` read from `offset` without validating entries.
    public init(decoding bytes: [UInt8], offset: UInt64) {
        self.offset = offset
        var entries: [BitmapTableEntry] = []
        entries.reserveCapacity(bytes.count / 8)
        bytes.withUnsafeBytes { raw in
            for i in 0..<(raw.count / 8) { entries.append(BitmapTableEntry(rawValue: BigEndian.load64(raw, i))) }
        }
        self.entries = entries
    }

    /// Reads the table of `entry` and checks every entry. The directory entry
    /// must have passed validation (so the size is bounded and inside the file).
    public static func read(for entry: BitmapDirectoryEntry, from device: BlockDevice,
                            geometry: BitmapGeometry) throws -> BitmapTable {
        let table = try readUnchecked(offset: entry.tableOffset, size: entry.tableSize, from: device, bitmap: entry.name)
        if let first = table.violations(geometry: geometry, bitmap: entry.name).first { throw first }
        return table
    }

    /// Reads `size` entries at `offset` (bounded by the caller) without checking them.
    static func readUnchecked(offset: UInt64, size: Int, from device: BlockDevice, bitmap: String) throws -> BitmapTable {
        precondition(size >= 0 && size <= BitmapLimits.maxTableEntries, "table size must be validated first")
        let bytes = try bitmapLayer(bitmap: bitmap) {
            try device.readBytes(size * 8, at: offset, region: "bitmap table")
        }
        return BitmapTable(decoding: bytes, offset: offset)
    }

    /// Every entry that breaks a rule: reserved bits, bit 0 with an offset,
    /// an unaligned offset, a data cluster past the end of the file.
    public func violations(geometry: BitmapGeometry, bitmap: String?) -> [BitmapError] {
        var found: [BitmapError] = []
        let clusterSize = UInt64(geometry.clusterSize)
        for (i, entry) in entries.enumerated() {
            let at = offset + UInt64(i) * 8
            func add(_ code: QCowError.Code, _ message: String) {
                found.append(BitmapError(code, "entry \(i): " + message, offset: at, region: "bitmap table", bitmap: bitmap))
            }
            if entry.rawValue & BitmapTableEntry.reservedMask != 0 {
                add(.corrupt, "reserved bits are set (0x\(String(entry.rawValue, radix: 16)))")
                continue
            }
            guard let data = entry.dataOffset else { continue }
            if entry.rawValue & BitmapTableEntry.allOnesFlag != 0 {
                add(.corrupt, "bit 0 is set together with a data cluster offset")
            } else if data % clusterSize != 0 {
                add(.corrupt, "data cluster offset 0x\(String(data, radix: 16)) is not cluster aligned")
            } else if data > geometry.fileSize || clusterSize > geometry.fileSize - data {
                add(.truncated, "data cluster at 0x\(String(data, radix: 16)) lies past the end of the file (\(geometry.fileSize) bytes)")
            }
        }
        return found
    }
}
