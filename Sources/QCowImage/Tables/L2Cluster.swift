/// One L2 entry (with its subcluster bitmap on extended L2 images) decoded once,
/// the one classifier that reads, writes, zeroing, freeing, map and check share —
/// the shape of QEMU's qcow2_get_cluster_type and qcow2_get_subcluster_type.
/// Decoding validates nothing against the file; `problems` lists what the entry
/// itself breaks, and each caller decides what a problem means for it.
///
/// On disk: qcow2.rst, "Cluster mapping" (standard and compressed descriptors) and
/// "Extended L2 Entries" (bits 0-31 allocated, bits 32-63 reads as zeros).
public struct L2Cluster: Equatable, Sendable {
    /// What the whole cluster is (QEMU's QCow2ClusterType).
    public enum Kind: Equatable, Sendable {
        /// No host cluster: each unit falls through to the backing file, unless its
        /// subcluster zero bit is set (extended L2).
        case unallocated
        /// Reads as zeros, no host cluster (v3 zero flag; never with extended L2).
        case zeroPlain
        /// Reads as zeros over a preallocated host cluster (zero flag plus offset; never with extended L2).
        case zeroAllocated
        /// A host cluster of guest data (with extended L2: the subclusters `dataUnits` says).
        case normal
        /// Compressed data: the first byte and the 512-byte sectors the descriptor covers.
        case compressed(host: UInt64, sectors: Int)
    }

    /// What is wrong with the entry itself (alignment of the host offset included).
    public enum Problem: Equatable, Sendable {
        /// Reserved bits of a standard descriptor set (bits 1-8, 56-61).
        case reservedBits(UInt64)
        /// Bit 0 (the zero flag of standard L2) set in an extended L2 entry, where it is reserved.
        case extendedZeroFlag
        /// The host offset of a standard cluster is not cluster aligned.
        case unalignedHost(UInt64)
        /// Subclusters marked both allocated and zero (bit mask).
        case allocatedAndZero(UInt32)
        /// Subclusters marked allocated in a cluster with no host offset.
        case allocatedWithoutHost
        /// COPIED set on a compressed descriptor.
        case compressedCopied
        /// A compressed cluster with a non-zero subcluster bitmap.
        case compressedBitmap
    }

    public let entry: L2Entry
    public let bitmap: L2Bitmap
    public let kind: Kind
    /// Units (32 subclusters with extended L2, else one cluster at bit 0) that read
    /// guest data from `host`. Compressed clusters: all units.
    public let dataUnits: UInt32
    /// Units that read as zeros.
    public let zeroUnits: UInt32
    let extendedL2: Bool
    let clusterMask: UInt64

    /// Decodes `entry` (and `bitmap`, ignored without extended L2). With an external
    /// data file, offset 0 with COPIED set is a data cluster at byte 0 of the data file.
    @inline(__always)
    public init(entry raw: UInt64, bitmap rawBitmap: UInt64, clusterBits: Int, extendedL2: Bool,
                externalDataFile: Bool = false) {
        let entry = L2Entry(rawValue: raw)
        let bitmap = L2Bitmap(rawValue: extendedL2 ? rawBitmap : 0)
        self.entry = entry
        self.bitmap = bitmap
        self.extendedL2 = extendedL2
        clusterMask = (UInt64(1) << UInt64(clusterBits)) - 1
        let allUnits: UInt32 = extendedL2 ? UInt32.max : 1
        if entry.compressed {
            let (host, sectors) = entry.compressedLocation(clusterBits: clusterBits)
            kind = .compressed(host: host, sectors: sectors)
            dataUnits = allUnits
            zeroUnits = 0
        } else if entry.zeroFlag && !extendedL2 {
            kind = entry.hostOffset != 0 ? .zeroAllocated : .zeroPlain
            dataUnits = 0
            zeroUnits = 1
        } else if entry.hostOffset != 0 || (externalDataFile && entry.copied) {
            kind = .normal
            dataUnits = extendedL2 ? bitmap.allocated : 1
            zeroUnits = extendedL2 ? bitmap.zero : 0
        } else {
            kind = .unallocated
            dataUnits = 0
            zeroUnits = extendedL2 ? bitmap.zero : 0
        }
    }

    /// The host cluster offset of a standard descriptor (normal or preallocated zero), else nil.
    public var host: UInt64? {
        switch kind {
        case .normal, .zeroAllocated: return entry.hostOffset
        default: return nil
        }
    }

    /// Whether the entry holds references to host clusters of the image file (a
    /// compressed range, or a standard cluster with a non-zero offset) that freeing drops.
    public var holdsHostClusters: Bool {
        if case .compressed = kind { return true }
        return (host ?? 0) != 0
    }

    /// Whether the cluster holds guest data anywhere (QEMU check's "contains data").
    public var containsData: Bool { dataUnits != 0 }

    /// Whether a standard cluster's host offset is not cluster aligned.
    public var unalignedHost: Bool { host.map { $0 & clusterMask != 0 } ?? false }

    /// A subcluster bitmap the read path refuses (QEMU's QCOW2_SUBCLUSTER_INVALID).
    public var invalidBitmap: Problem? {
        guard extendedL2 else { return nil }
        switch kind {
        case .normal where bitmap.allocated & bitmap.zero != 0: return .allocatedAndZero(bitmap.allocated & bitmap.zero)
        case .unallocated where bitmap.allocated != 0: return .allocatedWithoutHost
        default: return nil
        }
    }

    /// Everything the entry itself breaks, for `check`.
    public var problems: [Problem] {
        var found: [Problem] = []
        if case .compressed = kind {
            if entry.copied { found.append(.compressedCopied) }
            if bitmap.rawValue != 0 { found.append(.compressedBitmap) }
            return found
        }
        if entry.reservedBits != 0 { found.append(.reservedBits(entry.reservedBits)) }
        if extendedL2 && entry.zeroFlag { found.append(.extendedZeroFlag) }
        if let invalid = invalidBitmap { found.append(invalid) }
        if unalignedHost, let host { found.append(.unalignedHost(host)) }
        return found
    }

    /// What unit `unit` (a subcluster index with extended L2, else 0) maps to; host
    /// offsets are of the unit's first byte. Call only when `invalidBitmap` is nil.
    @inline(__always)
    public func mapping(unit: Int, unitSize: Int) -> ClusterMapping {
        switch kind {
        case .compressed(let host, let sectors):
            return .compressed(host: host, length: sectors * 512 - Int(host & 511))
        case .zeroPlain:
            return .zero(host: nil)
        case .zeroAllocated:
            return .zero(host: entry.hostOffset)
        case .unallocated:
            return zeroUnits & (UInt32(1) << UInt32(unit)) != 0 ? .zero(host: nil) : .unallocated
        case .normal:
            let mask = UInt32(1) << UInt32(unit)
            let host = entry.hostOffset + UInt64(unit * unitSize)
            if zeroUnits & mask != 0 { return .zero(host: host) }
            if dataUnits & mask != 0 { return .data(host: host) }
            return .unallocated
        }
    }
}
