import QCowImage

/// Flags of a bitmap directory entry — qcow2.rst, "Bitmap directory", bytes 12-15.
public struct BitmapFlags: OptionSet, Sendable, Hashable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// in_use: the bitmap was not saved correctly and may be inconsistent.
    public static let inUse = Self(rawValue: 1 << 0)
    /// auto: the bitmap is enabled and must reflect every write.
    public static let auto = Self(rawValue: 1 << 1)
    /// extra_data_compatible: the bitmap may be used even if its extra data is unknown.
    public static let extraDataCompatible = Self(rawValue: 1 << 2)
    /// Bits 3-31 are reserved and must be zero.
    public static let reserved = Self(rawValue: ~UInt32(0b111))
}

/// A bitmap directory entry as it is on disk, field by field, in spec order.
///
/// On disk: bytes 0..<24, then extra_data, then name, padded to 8 with zeros —
/// qcow2.rst, "Bitmap directory". Decoding checks only that the entry fits.
public struct RawBitmapDirectoryEntry: Equatable, Sendable {
    /// Bytes of the fixed part.
    public static let fixedSize = 24

    /// bitmap_table_offset
    public var bitmapTableOffset: UInt64
    /// bitmap_table_size (entries)
    public var bitmapTableSize: UInt32
    /// flags
    public var flags: UInt32
    /// type
    public var type: UInt8
    /// granularity_bits
    public var granularityBits: UInt8
    /// name_size
    public var nameSize: UInt16
    /// extra_data_size
    public var extraDataSize: UInt32
    /// extra_data, kept as is.
    public var extraData: [UInt8]
    /// name (not null terminated).
    public var name: [UInt8]
    /// The padding bytes as read (must be zero; encoding always writes zeros).
    public var padding: [UInt8]

    /// An entry from its fields; name_size and extra_data_size follow the arrays.
    public init(bitmapTableOffset: UInt64, bitmapTableSize: UInt32, flags: UInt32, type: UInt8, granularityBits: UInt8,
                extraData: [UInt8] = [], name: [UInt8]) {
        self.bitmapTableOffset = bitmapTableOffset
        self.bitmapTableSize = bitmapTableSize
        self.flags = flags
        self.type = type
        self.granularityBits = granularityBits
        self.nameSize = UInt16(truncatingIfNeeded: name.count)
        self.extraDataSize = UInt32(truncatingIfNeeded: extraData.count)
        self.extraData = extraData
        self.name = name
        self.padding = []
    }

    /// Size of the entry on disk, padding included.
    public var encodedSize: Int { Self.encodedSize(nameSize: Int(nameSize), extraDataSize: Int(extraDataSize)) }

    /// Size on disk of an entry with these variable parts.
    public static func encodedSize(nameSize: Int, extraDataSize: Int) -> Int {
        (fixedSize + extraDataSize + nameSize + 7) & ~7
    }

    /// Decodes one entry at the reader's position, advancing past its padding.
    /// Throws `truncated` if the entry runs past the end of the reader's bytes.
    public init(decoding reader: inout ByteReader) throws {
        let start = reader.position
        guard reader.remaining >= Self.fixedSize else {
            throw reader.error(.truncated, "directory entry needs 24 bytes but only \(reader.remaining) remain in the directory")
        }
        bitmapTableOffset = try reader.u64()
        bitmapTableSize = try reader.u32()
        flags = try reader.u32()
        type = try reader.u8()
        granularityBits = try reader.u8()
        nameSize = try reader.u16()
        extraDataSize = try reader.u32()
        let size = Self.encodedSize(nameSize: Int(nameSize), extraDataSize: Int(extraDataSize))
        guard size - Self.fixedSize <= reader.remaining else {
            throw reader.error(.truncated, "directory entry with extra_data_size \(extraDataSize) and name_size \(nameSize) runs past the end of the directory",
                               at: start)
        }
        extraData = try reader.bytes(Int(extraDataSize))
        name = try reader.bytes(Int(nameSize))
        padding = try reader.bytes(size - (reader.position - start))
    }

    /// Appends the entry, padded to 8 with zeros.
    public func encode(into writer: inout ByteWriter) {
        writer.u64(bitmapTableOffset)
        writer.u32(bitmapTableSize)
        writer.u32(flags)
        writer.u8(type)
        writer.u8(granularityBits)
        writer.u16(nameSize)
        writer.u32(extraDataSize)
        writer.append(extraData)
        writer.append(name)
        writer.zeros(encodedSize - Self.fixedSize - extraData.count - name.count)
    }
}

/// What validation of a bitmap needs to know about its image.
public struct BitmapGeometry: Equatable, Sendable {
    /// The image's cluster size.
    public var clusterSize: Int
    /// The image file's size, for references past its end.
    public var fileSize: UInt64
    /// The virtual disk size every bitmap covers.
    public var virtualSize: UInt64

    public init(clusterSize: Int, fileSize: UInt64, virtualSize: UInt64) {
        self.clusterSize = clusterSize
        self.fileSize = fileSize
        self.virtualSize = virtualSize
    }

    /// Entries of the bitmap table a consistent bitmap of this granularity needs:
    /// one cluster per `clusterSize * 8` bits, a bit per granule of the virtual disk.
    public func expectedTableSize(granularityBits: Int) -> UInt64 {
        let granularity = UInt64(1) << UInt64(granularityBits)
        let bits = virtualSize / granularity + (virtualSize % granularity == 0 ? 0 : 1)
        let bytes = (bits + 7) / 8
        return (bytes + UInt64(clusterSize) - 1) / UInt64(clusterSize)
    }
}

/// A validated bitmap directory entry: one persistent bitmap's description.
public struct BitmapDirectoryEntry: Equatable, Sendable {
    /// The name as stored (compared byte for byte for uniqueness).
    public var nameBytes: [UInt8]
    /// in_use, auto, extra_data_compatible.
    public var flags: BitmapFlags
    /// log2 of the granularity (9...31).
    public var granularityBits: Int
    /// Where the bitmap table starts (cluster aligned).
    public var tableOffset: UInt64
    /// Entries in the bitmap table.
    public var tableSize: Int
    /// Type-specific extra data, kept as is.
    public var extraData: [UInt8]
    /// File offset of this entry in the directory it was read from (nil for a new entry).
    public var entryOffset: UInt64?

    /// The name, decoded as UTF-8.
    public var name: String { String(decoding: nameBytes, as: UTF8.self) }
    /// Bytes of the virtual disk per bit.
    public var granularity: UInt64 { UInt64(1) << UInt64(granularityBits) }
    /// The bitmap is enabled: it tracks every write (the auto flag).
    public var isEnabled: Bool { flags.contains(.auto) }
    /// The bitmap is marked in_use (not saved correctly, may be inconsistent).
    public var isInUse: Bool { flags.contains(.inUse) }
    /// Extra data unknown to us without the extra_data_compatible flag: the bitmap must not be used.
    public var hasIncompatibleExtraData: Bool { !extraData.isEmpty && !flags.contains(.extraDataCompatible) }

    /// A new entry.
    public init(name: String, flags: BitmapFlags, granularityBits: Int, tableOffset: UInt64, tableSize: Int,
                extraData: [UInt8] = []) {
        self.nameBytes = Array(name.utf8)
        self.flags = flags
        self.granularityBits = granularityBits
        self.tableOffset = tableOffset
        self.tableSize = tableSize
        self.extraData = extraData
        self.entryOffset = nil
    }

    /// Validates a raw entry found at `entryOffset`; throws the first rule it breaks.
    public init(validating raw: RawBitmapDirectoryEntry, entryOffset: UInt64, geometry: BitmapGeometry) throws {
        if let first = Self.violations(of: raw, entryOffset: entryOffset, geometry: geometry).first { throw first }
        nameBytes = raw.name
        flags = BitmapFlags(rawValue: raw.flags)
        granularityBits = Int(raw.granularityBits)
        tableOffset = raw.bitmapTableOffset
        tableSize = Int(raw.bitmapTableSize)
        extraData = raw.extraData
        self.entryOffset = entryOffset
    }

    /// The on-disk form.
    public var raw: RawBitmapDirectoryEntry {
        RawBitmapDirectoryEntry(bitmapTableOffset: tableOffset, bitmapTableSize: UInt32(tableSize), flags: flags.rawValue,
                                type: 1, granularityBits: UInt8(granularityBits), extraData: extraData, name: nameBytes)
    }

    /// Every rule of the spec and of QEMU that `raw` breaks, in field order.
    /// Duplicate names are a rule of the directory, checked there.
    public static func violations(of raw: RawBitmapDirectoryEntry, entryOffset: UInt64,
                                  geometry: BitmapGeometry) -> [BitmapError] {
        let region = "bitmap directory"
        let name = String(decoding: raw.name, as: UTF8.self)
        var found: [BitmapError] = []
        func add(_ code: QCowError.Code, _ message: String, _ field: Int) {
            found.append(BitmapError(code, message, offset: entryOffset + UInt64(field), region: region,
                                     bitmap: name.isEmpty ? nil : name))
        }
        let hex = { (v: UInt64) in "0x" + String(v, radix: 16) }
        let clusterSize = UInt64(geometry.clusterSize)
        var tableUsable = true
        if raw.bitmapTableOffset == 0 || raw.bitmapTableOffset % clusterSize != 0 {
            add(.corrupt, "bitmap_table_offset \(hex(raw.bitmapTableOffset)) is not a nonzero multiple of the cluster size", 0)
            tableUsable = false
        }
        if raw.bitmapTableSize == 0 {
            add(.corrupt, "bitmap_table_size is 0", 8)
            tableUsable = false
        } else if raw.bitmapTableSize > UInt32(BitmapLimits.maxTableEntries) {
            add(.unsupported, "bitmap_table_size \(raw.bitmapTableSize) exceeds the limit of \(BitmapLimits.maxTableEntries) entries", 8)
            tableUsable = false
        } else if UInt64(raw.bitmapTableSize) * clusterSize > BitmapLimits.maxDataBytes {
            add(.unsupported, "bitmap_table_size \(raw.bitmapTableSize) describes more than QEMU's limit of \(BitmapLimits.maxDataBytes) bytes of bitmap data", 8)
            tableUsable = false
        }
        if tableUsable {
            let tableBytes = UInt64(raw.bitmapTableSize) * 8
            if raw.bitmapTableOffset > geometry.fileSize || tableBytes > geometry.fileSize - raw.bitmapTableOffset {
                add(.truncated, "bitmap table (\(raw.bitmapTableSize) entries at \(hex(raw.bitmapTableOffset))) runs past the end of the file (\(geometry.fileSize) bytes)", 0)
            }
        }
        if raw.flags & BitmapFlags.reserved.rawValue != 0 {
            add(.corrupt, "flags 0x\(String(raw.flags, radix: 16)) has reserved bits (3-31) set", 12)
        }
        if raw.type != 1 {
            add(.unsupported, "type \(raw.type) is not 1 (dirty tracking bitmap)", 16)
        }
        let granularityValid = BitmapLimits.granularityBits.contains(Int(raw.granularityBits))
        if !granularityValid {
            add(.unsupported, "granularity_bits \(raw.granularityBits) is outside the supported range 9-31", 17)
        }
        if raw.nameSize == 0 {
            add(.corrupt, "name_size is 0; a bitmap name must be non-empty", 18)
        } else if Int(raw.nameSize) > BitmapLimits.maxNameBytes {
            add(.unsupported, "name_size \(raw.nameSize) exceeds the limit of \(BitmapLimits.maxNameBytes) bytes", 18)
        }
        if raw.padding.contains(where: { $0 != 0 }) {
            add(.corrupt, "padding after the name is not zero", RawBitmapDirectoryEntry.fixedSize + raw.extraData.count + raw.name.count)
        }
        if granularityValid, raw.bitmapTableSize != 0, raw.flags & BitmapFlags.inUse.rawValue == 0 {
            // An in_use bitmap may have a stale size (an image resized without saving it); QEMU allows that.
            let expected = geometry.expectedTableSize(granularityBits: Int(raw.granularityBits))
            if UInt64(raw.bitmapTableSize) != expected {
                add(.corrupt, "bitmap_table_size \(raw.bitmapTableSize) does not match the virtual size \(geometry.virtualSize) at granularity \(UInt64(1) << UInt64(raw.granularityBits)) (expected \(expected))", 8)
            }
        }
        return found
    }
}

/// The bitmap directory: the entries, back to back — qcow2.rst, "Bitmap directory".
public enum BitmapDirectory {
    /// Splits the directory bytes into entries, with the file offset of each.
    /// Checks the structure only: entries fit, their count equals nb_bitmaps, they fill the directory exactly.
    public static func decode(_ bytes: [UInt8], baseOffset: UInt64,
                              expectedCount: Int) throws -> [(entry: RawBitmapDirectoryEntry, offset: UInt64)] {
        var reader = ByteReader(bytes, baseOffset: baseOffset, region: "bitmap directory")
        var entries: [(entry: RawBitmapDirectoryEntry, offset: UInt64)] = []
        while reader.remaining > 0 {
            guard entries.count < expectedCount else {
                throw BitmapError(.corrupt, "the directory holds more entries than nb_bitmaps (\(expectedCount)), or bitmap_directory_size is too large",
                                  offset: reader.fileOffset, region: "bitmap directory")
            }
            let offset = reader.fileOffset
            let entry = try bitmapLayer { try RawBitmapDirectoryEntry(decoding: &reader) }
            entries.append((entry, offset))
        }
        guard entries.count == expectedCount else {
            throw BitmapError(.corrupt, "the directory holds \(entries.count) entries, but nb_bitmaps is \(expectedCount)",
                              offset: baseOffset, region: "bitmap directory")
        }
        return entries
    }

    /// The directory bytes for `entries`.
    public static func encode(_ entries: [RawBitmapDirectoryEntry]) -> [UInt8] {
        var writer = ByteWriter(capacity: entries.reduce(0) { $0 + $1.encodedSize })
        for entry in entries { entry.encode(into: &writer) }
        return writer.bytes
    }

    /// The first pair of entries with the same name, as (first index, duplicate index).
    static func firstDuplicate(_ names: [[UInt8]]) -> (Int, Int)? {
        var seen: [[UInt8]: Int] = [:]
        for (i, name) in names.enumerated() {
            if let first = seen[name] { return (first, i) }
            seen[name] = i
        }
        return nil
    }
}
