import FoundationEssentials
import QCowImage

/// QEMU's limits on persistent bitmaps (block/qcow2.h, block/qcow2-bitmap.c),
/// enforced before anything is allocated from a value read from the file.
public enum BitmapLimits {
    /// At most this many bitmaps in one image (QCOW2_MAX_BITMAPS).
    public static let maxBitmaps = 65535
    /// The bitmap directory is at most this many bytes (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
    public static let maxDirectoryBytes = 1024 * maxBitmaps
    /// Names are 1 to this many bytes (BME_MAX_NAME_SIZE).
    public static let maxNameBytes = 1023
    /// Granularity bits QEMU supports (BME_MIN/MAX_GRANULARITY_BITS).
    public static let granularityBits: ClosedRange<Int> = 9...31
    /// At most this many entries in one bitmap table (BME_MAX_TABLE_SIZE).
    public static let maxTableEntries = 0x800_0000
    /// At most this many bytes of clusters for one bitmap's data (BME_MAX_PHYS_SIZE).
    public static let maxDataBytes: UInt64 = 0x2000_0000

    /// Why `name` may not be given to a bitmap qbackup creates, or nil when it may: 1 to
    /// `maxNameBytes` bytes of UTF-8 without control characters. (QEMU limits only the length,
    /// so a name QEMU made is still read whatever it holds.) Invalid UTF-8 never reaches a
    /// `String` unrepaired: callers holding raw bytes check those first.
    public static func problem(withNewName name: String) -> String? {
        let bytes = name.utf8.count
        if bytes == 0 { return "a bitmap name must not be empty" }
        if bytes > maxNameBytes { return "a bitmap name must be at most \(maxNameBytes) bytes, not \(bytes)" }
        if let c = name.unicodeScalars.first(where: { $0.properties.generalCategory == .control }) {
            return "a bitmap name must not contain control characters (U+\(String(printf: "%04X", c.value)))"
        }
        return nil
    }
}

/// The bitmaps header extension as it is on disk, field by field.
///
/// On disk: header extension 0x23852875, 24 bytes — qcow2.rst, "Bitmaps extension".
public struct RawBitmapsExtension: Equatable, Sendable {
    /// The extension's size on disk.
    public static let encodedSize = 24

    /// nb_bitmaps: the number of bitmaps in the directory.
    public var nbBitmaps: UInt32
    /// Bytes 4-7, reserved, must be zero.
    public var reserved: UInt32
    /// bitmap_directory_size: the directory's size in bytes.
    public var bitmapDirectorySize: UInt64
    /// bitmap_directory_offset: where the directory starts in the file.
    public var bitmapDirectoryOffset: UInt64

    /// A raw extension from its fields.
    public init(nbBitmaps: UInt32, reserved: UInt32 = 0, bitmapDirectorySize: UInt64, bitmapDirectoryOffset: UInt64) {
        self.nbBitmaps = nbBitmaps
        self.reserved = reserved
        self.bitmapDirectorySize = bitmapDirectorySize
        self.bitmapDirectoryOffset = bitmapDirectoryOffset
    }

    /// Decodes the extension's data (without its type and length words).
    public init(decoding reader: inout ByteReader) throws {
        nbBitmaps = try reader.u32()
        reserved = try reader.u32()
        bitmapDirectorySize = try reader.u64()
        bitmapDirectoryOffset = try reader.u64()
    }

    /// The 24 bytes of the extension's data.
    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: Self.encodedSize)
        w.u32(nbBitmaps)
        w.u32(reserved)
        w.u64(bitmapDirectorySize)
        w.u64(bitmapDirectoryOffset)
        return w.bytes
    }
}

/// The validated bitmaps extension: where the directory is and how many entries it has.
public struct BitmapsExtension: Equatable, Sendable {
    /// The number of bitmaps (1...65535).
    public var count: Int
    /// The directory's size in bytes (at most `BitmapLimits.maxDirectoryBytes`).
    public var directorySize: Int
    /// The directory's cluster-aligned offset in the file.
    public var directoryOffset: UInt64

    /// An extension describing a directory of `count` entries at `directoryOffset`.
    public init(count: Int, directorySize: Int, directoryOffset: UInt64) {
        self.count = count
        self.directorySize = directorySize
        self.directoryOffset = directoryOffset
    }

    /// The on-disk form.
    public var raw: RawBitmapsExtension {
        RawBitmapsExtension(nbBitmaps: UInt32(count), bitmapDirectorySize: UInt64(directorySize),
                            bitmapDirectoryOffset: directoryOffset)
    }

    /// Decodes and validates the extension's data against QEMU's limits, the
    /// cluster size and the file size. `extensionOffset` is the file offset of
    /// the data, for messages.
    public init(validating data: [UInt8], extensionOffset: UInt64, clusterSize: Int, fileSize: UInt64) throws {
        let region = "bitmaps extension"
        func fail(_ code: QCowError.Code, _ message: String, _ field: Int) -> BitmapError {
            BitmapError(code, message, offset: extensionOffset + UInt64(field), region: region)
        }
        guard data.count == RawBitmapsExtension.encodedSize else {
            throw fail(.invalidFormat, "extension length is \(data.count) bytes, expected 24", 0)
        }
        var reader = ByteReader(data, baseOffset: extensionOffset, region: region)
        let raw = try bitmapLayer { try RawBitmapsExtension(decoding: &reader) }
        guard raw.reserved == 0 else {
            throw fail(.invalidFormat, "reserved field (bytes 4-7) is 0x\(String(raw.reserved, radix: 16)), must be zero", 4)
        }
        guard raw.nbBitmaps >= 1 else {
            throw fail(.corrupt, "nb_bitmaps is 0, but the extension must describe at least one bitmap", 0)
        }
        guard raw.nbBitmaps <= UInt32(BitmapLimits.maxBitmaps) else {
            throw fail(.unsupported, "nb_bitmaps \(raw.nbBitmaps) exceeds the limit of \(BitmapLimits.maxBitmaps)", 0)
        }
        guard raw.bitmapDirectorySize > 0 else {
            throw fail(.corrupt, "bitmap_directory_size is 0", 8)
        }
        guard raw.bitmapDirectorySize <= UInt64(BitmapLimits.maxDirectoryBytes) else {
            throw fail(.unsupported, "bitmap_directory_size \(raw.bitmapDirectorySize) exceeds the limit of \(BitmapLimits.maxDirectoryBytes) bytes", 8)
        }
        // Every entry takes at least 32 bytes (24 fixed, a name of at least one byte, padding to 8).
        guard UInt64(raw.nbBitmaps) * 32 <= raw.bitmapDirectorySize else {
            throw fail(.corrupt, "bitmap_directory_size \(raw.bitmapDirectorySize) is too small for nb_bitmaps \(raw.nbBitmaps) entries", 8)
        }
        guard raw.bitmapDirectoryOffset != 0, raw.bitmapDirectoryOffset % UInt64(clusterSize) == 0 else {
            throw fail(.corrupt, "bitmap_directory_offset 0x\(String(raw.bitmapDirectoryOffset, radix: 16)) is not a nonzero multiple of the cluster size", 16)
        }
        guard raw.bitmapDirectoryOffset <= fileSize, raw.bitmapDirectorySize <= fileSize - raw.bitmapDirectoryOffset else {
            throw fail(.truncated, "bitmap directory (\(raw.bitmapDirectorySize) bytes at 0x\(String(raw.bitmapDirectoryOffset, radix: 16))) runs past the end of the file (\(fileSize) bytes)", 16)
        }
        count = Int(raw.nbBitmaps)
        directorySize = Int(raw.bitmapDirectorySize)
        directoryOffset = raw.bitmapDirectoryOffset
    }
}

extension QCowHeader {
    /// The file offset of the data of the extension of `type`, if present
    /// (header extensions follow the header, each padded to 8 bytes).
    func extensionDataOffset(_ type: UInt32) -> UInt64? {
        var position = UInt64(version == 2 ? QCowHeader.v2Length : Int(headerLength))
        for ext in extensions {
            if ext.type == type { return position + 8 }
            position += 8 + UInt64((ext.data.count + 7) & ~7)
        }
        return nil
    }
}
