/// An L1 table entry — qcow2.rst, "Cluster mapping": bits 9-55 hold the
/// offset of an L2 table, bit 63 is COPIED (refcount exactly 1).
public struct L1Entry: Equatable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(l2Offset: UInt64, copied: Bool) {
        rawValue = l2Offset | (copied ? Self.copiedFlag : 0)
    }

    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let copiedFlag: UInt64 = 1 << 63
    /// Bits 1-8 and 56-62 must be zero.
    public static let reservedMask: UInt64 = 0x7f00_0000_0000_01ff

    public var l2Offset: UInt64 { rawValue & Self.offsetMask }
    public var copied: Bool { rawValue & Self.copiedFlag != 0 }
    public var reservedBits: UInt64 { rawValue & Self.reservedMask }
}

/// An L2 table entry (the first 64 bits; extended L2 adds `L2Bitmap`) —
/// qcow2.rst, "Standard Cluster Descriptor" and "Compressed Clusters Descriptor".
public struct L2Entry: Equatable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let copiedFlag: UInt64 = 1 << 63
    public static let compressedFlag: UInt64 = 1 << 62
    public static let zeroFlag: UInt64 = 1 << 0
    public static let standardOffsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    /// Bits 1-8 and 56-61 of a standard descriptor must be zero.
    public static let standardReservedMask: UInt64 = 0x3f00_0000_0000_01fe

    public var copied: Bool { rawValue & Self.copiedFlag != 0 }
    public var compressed: Bool { rawValue & Self.compressedFlag != 0 }
    public var zeroFlag: Bool { rawValue & Self.zeroFlag != 0 }
    public var hostOffset: UInt64 { rawValue & Self.standardOffsetMask }
    public var reservedBits: UInt64 { compressed ? 0 : rawValue & Self.standardReservedMask }

    public static func data(host: UInt64, copied: Bool = true) -> L2Entry {
        L2Entry(rawValue: host | (copied ? copiedFlag : 0))
    }
    public static let unallocated = L2Entry(rawValue: 0)
    public static let zero = L2Entry(rawValue: zeroFlag)

    /// Where a compressed cluster lives: x = 62 - (cluster_bits - 8) bits of
    /// host offset, then the number of additional 512-byte sectors.
    public func compressedLocation(clusterBits: Int) -> (host: UInt64, sectors: Int) {
        let x = 62 - (clusterBits - 8)
        let offsetMask: UInt64 = (1 << UInt64(x)) - 1
        let host = rawValue & offsetMask
        let extra = (rawValue & ~(Self.copiedFlag | Self.compressedFlag)) >> UInt64(x)
        return (host, Int(extra) + 1)
    }

    /// The compressed-cluster descriptor for data at `host` spanning `sectors` 512-byte sectors.
    public static func compressed(host: UInt64, sectors: Int, clusterBits: Int) -> L2Entry {
        let x = 62 - (clusterBits - 8)
        return L2Entry(rawValue: compressedFlag | host | (UInt64(sectors - 1) << UInt64(x)))
    }
}

/// The second half of an extended L2 entry: bits 0-31 say a subcluster is
/// allocated, bits 32-63 that it reads as zeros — qcow2.rst, "Extended L2 Entries".
public struct L2Bitmap: Equatable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(allocated: UInt32, zero: UInt32) { rawValue = UInt64(zero) << 32 | UInt64(allocated) }
    public var allocated: UInt32 { UInt32(truncatingIfNeeded: rawValue) }
    public var zero: UInt32 { UInt32(truncatingIfNeeded: rawValue >> 32) }
}

/// What one guest cluster (or subcluster) maps to; reads, writes, map and check share it.
public enum ClusterMapping: Equatable, Sendable {
    /// Not allocated here: read from the backing file (or zeros).
    case unallocated
    /// Reads as zeros; `host` is a preallocated cluster if any.
    case zero(host: UInt64?)
    /// Guest data at this host offset.
    case data(host: UInt64)
    /// Compressed data: the first byte and the length the descriptor covers.
    case compressed(host: UInt64, length: Int)

    /// Whether two mappings belong to one extent when `next` is `bytes` further on.
    func continues(_ other: ClusterMapping, after bytes: UInt64) -> Bool {
        switch (self, other) {
        case (.unallocated, .unallocated): return true
        case (.zero(let a), .zero(let b)):
            if let a, let b { return b == a + bytes }
            return a == nil && b == nil
        case (.data(let a), .data(let b)): return b == a + bytes
        default: return false
        }
    }
}

/// A refcount table entry: bits 9-63 are the offset of a refcount block.
public struct RefcountTableEntry: Equatable, Sendable {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public static let offsetMask: UInt64 = 0xffff_ffff_ffff_fe00
    public var blockOffset: UInt64 { rawValue & Self.offsetMask }
    public var reservedBits: UInt64 { rawValue & 0x1ff }
}
