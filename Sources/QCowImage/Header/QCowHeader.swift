/// The qcow2 header, versions 2 and 3, with its extensions.
///
/// On disk: bytes 0..<72 (v2) or 0..<header_length (v3), then header
/// extensions, then the backing file name — qcow2.rst, "Header".
/// Fields past the 112 bytes qbackup knows are kept in `unknownHeaderBytes`
/// so a rewrite round-trips them.
public struct QCowHeader: Equatable, Sendable {
    public static let magic: UInt32 = 0x5146_49fb
    public static let v2Length = 72
    public static let v3Length = 104
    public static let v3LengthWithCompression = 112

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var nbSnapshots: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: IncompatibleFeatures
    public var compatibleFeatures: CompatibleFeatures
    public var autoclearFeatures: AutoclearFeatures
    public var refcountOrder: UInt32
    public var headerLength: UInt32
    public var compressionType: UInt8
    /// Header bytes past offset 112 that this version of qbackup does not know.
    public var unknownHeaderBytes: [UInt8]
    public var extensions: [HeaderExtension]
    public var backingFile: String?

    /// A new v3 header with every optional field empty.
    public init(clusterBits: UInt32, size: UInt64, refcountOrder: UInt32 = 4) {
        version = 3
        backingFileOffset = 0
        backingFileSize = 0
        self.clusterBits = clusterBits
        self.size = size
        cryptMethod = 0
        l1Size = 0
        l1TableOffset = 0
        refcountTableOffset = 0
        refcountTableClusters = 0
        nbSnapshots = 0
        snapshotsOffset = 0
        incompatibleFeatures = []
        compatibleFeatures = []
        autoclearFeatures = []
        self.refcountOrder = refcountOrder
        headerLength = UInt32(Self.v3LengthWithCompression)
        compressionType = 0
        unknownHeaderBytes = []
        extensions = []
        backingFile = nil
    }

    public var clusterSize: Int { 1 << Int(clusterBits) }
    public var refcountBits: Int { 1 << Int(refcountOrder) }
    public var extendedL2: Bool { incompatibleFeatures.contains(.extendedL2) }
    /// Bytes per L2 entry: 16 with extended L2, else 8.
    public var l2EntrySize: Int { extendedL2 ? 16 : 8 }
    public var l2EntriesPerTable: Int { clusterSize / l2EntrySize }
    public var compression: CompressionType { CompressionType(rawValue: compressionType) ?? .zlib }
}

/// Incompatible feature bits — qcow2.rst header bytes 72-79.
public struct IncompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let dirty = Self(rawValue: 1 << 0)
    public static let corrupt = Self(rawValue: 1 << 1)
    public static let externalDataFile = Self(rawValue: 1 << 2)
    public static let compressionType = Self(rawValue: 1 << 3)
    public static let extendedL2 = Self(rawValue: 1 << 4)
    public static let known: Self = [.dirty, .corrupt, .externalDataFile, .compressionType, .extendedL2]
}

/// Compatible feature bits — qcow2.rst header bytes 80-87.
public struct CompatibleFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let lazyRefcounts = Self(rawValue: 1 << 0)
}

/// Autoclear feature bits — qcow2.rst header bytes 88-95.
public struct AutoclearFeatures: OptionSet, Sendable, Hashable {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let bitmaps = Self(rawValue: 1 << 0)
    public static let rawExternalData = Self(rawValue: 1 << 1)
    public static let known: Self = [.bitmaps, .rawExternalData]
}

/// The compression_type header field (byte 104).
public enum CompressionType: UInt8, Sendable {
    case zlib = 0
    case zstd = 1
    public var name: String { self == .zlib ? "zlib" : "zstd" }
}

/// One header extension: type, then data padded to 8 bytes — qcow2.rst, "Header extensions".
public struct HeaderExtension: Equatable, Sendable {
    public var type: UInt32
    public var data: [UInt8]
    public init(type: UInt32, data: [UInt8]) {
        self.type = type
        self.data = data
    }

    public static let end: UInt32 = 0
    public static let backingFormat: UInt32 = 0xe279_2aca
    public static let featureNameTable: UInt32 = 0x6803_f857
    public static let bitmaps: UInt32 = 0x2385_2875
    public static let fullDiskEncryption: UInt32 = 0x0537_be77
    public static let externalDataFile: UInt32 = 0x4441_5441
}

/// One entry of the feature name table (48 bytes: type, bit, 46-byte name).
public struct FeatureName: Equatable, Sendable {
    public enum Kind: UInt8, Sendable { case incompatible = 0, compatible = 1, autoclear = 2 }
    public var kind: UInt8
    public var bit: UInt8
    public var name: String
}

extension QCowHeader {
    /// The extension of `type`, if present.
    public func extensionData(_ type: UInt32) -> [UInt8]? {
        extensions.first { $0.type == type }?.data
    }

    /// The file offset of the extension of `type` (its type field), for error messages.
    public func extensionOffset(_ type: UInt32) -> UInt64? {
        var position = UInt64(version == 2 ? Self.v2Length : Int(headerLength))
        for ext in extensions {
            if ext.type == type { return position }
            position += 8 + UInt64((ext.data.count + 7) & ~7)
        }
        return nil
    }

    /// Replaces (or with nil removes) the extension of `type`.
    public mutating func setExtension(_ type: UInt32, _ data: [UInt8]?) {
        if let index = extensions.firstIndex(where: { $0.type == type }) {
            if let data { extensions[index].data = data } else { extensions.remove(at: index) }
        } else if let data {
            extensions.append(HeaderExtension(type: type, data: data))
        }
    }

    /// The backing format extension as a string ("qcow2", "raw").
    public var backingFormat: String? {
        extensionData(HeaderExtension.backingFormat).map { String(decoding: $0, as: UTF8.self) }
    }

    /// The external data file name, when the image has one.
    public var externalDataFile: String? {
        extensionData(HeaderExtension.externalDataFile).map { String(decoding: $0, as: UTF8.self) }
    }

    /// The feature name table, decoded as QEMU reads it: a short last entry as far as it goes
    /// (the rest reads as zeros), and the table ends at the first entry without a name.
    public var featureNames: [FeatureName] {
        guard let data = extensionData(HeaderExtension.featureNameTable) else { return [] }
        var out: [FeatureName] = []
        var i = 0
        while i + 2 < data.count {
            let nameBytes = data[(i + 2)..<min(i + 48, data.count)].prefix { $0 != 0 }
            if nameBytes.isEmpty { break }
            out.append(FeatureName(kind: data[i], bit: data[i + 1], name: String(decoding: nameBytes, as: UTF8.self)))
            i += 48
        }
        return out
    }

    /// The name of a feature bit: from the image's table if it has one, else qbackup's own.
    public func featureName(kind: FeatureName.Kind, bit: Int) -> String {
        if let entry = featureNames.first(where: { $0.kind == kind.rawValue && Int($0.bit) == bit }) {
            return entry.name
        }
        switch (kind, bit) {
        case (.incompatible, 0): return "dirty bit"
        case (.incompatible, 1): return "corrupt bit"
        case (.incompatible, 2): return "external data file"
        case (.incompatible, 3): return "compression type"
        case (.incompatible, 4): return "extended L2 entries"
        case (.compatible, 0): return "lazy refcounts"
        case (.autoclear, 0): return "bitmaps"
        case (.autoclear, 1): return "raw external data"
        default: return "unknown \(kind) feature bit \(bit)"
        }
    }

    /// The feature name table qbackup writes into images it creates, as QEMU does.
    public static var standardFeatureNameTable: [UInt8] {
        let names: [(UInt8, UInt8, String)] = [
            (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
            (0, 3, "compression type"), (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"), (2, 1, "raw external data"),
        ]
        var w = ByteWriter()
        for (kind, bit, name) in names {
            w.u8(kind)
            w.u8(bit)
            var n = Array(name.utf8.prefix(46))
            n += repeatElement(0, count: 46 - n.count)
            w.append(n)
        }
        return w.bytes
    }
}
