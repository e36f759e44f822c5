/// A disk as the guest sees it: a qcow2 file (with its backing chain) or a raw file.
public protocol GuestImage: GuestReader {
    /// The path the image was opened by.
    var filename: String { get }
    /// "qcow2" or "raw".
    var formatName: String { get }
    var virtualSize: UInt64 { get }
    /// The next image down the chain, if any.
    var backing: GuestImage? { get }
    /// What this layer alone says about `offset`, for up to `maxLength` bytes (at least one byte).
    func layerStatus(at offset: UInt64, maxLength: UInt64) throws -> LayerExtent
    /// Reads guest data (through the backing chain) into `buffer`; past the end reads as zeros.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// The backing chain's file descriptors are released.
    func close()
}

/// A run of one layer with one mapping.
public struct LayerExtent: Equatable, Sendable {
    public var length: UInt64
    public var mapping: ClusterMapping
    /// For unallocated subclusters of an allocated extended-L2 cluster: the host
    /// offset they would use (QEMU reports it when nothing below is allocated).
    public var unallocatedHost: UInt64?
    public init(length: UInt64, mapping: ClusterMapping, unallocatedHost: UInt64? = nil) {
        self.length = length
        self.mapping = mapping
        self.unallocatedHost = unallocatedHost
    }
}

/// What a guest range is, looking through the whole chain.
public struct BlockStatus: Equatable, Sendable {
    public enum Kind: Sendable { case data, zero, unallocated }
    public var start: UInt64
    public var length: UInt64
    /// 0 for the top image, 1 for its backing file, ...
    public var depth: Int
    public var kind: Kind
    /// The host offset of the data (or of a preallocated zero cluster), nil for compressed data.
    public var hostOffset: UInt64?
    public var compressed: Bool
    /// Allocated at some layer (QEMU's "present").
    public var present: Bool { kind != .unallocated }

    /// Status of a guest range from a source other than an image (an NBD export).
    public init(start: UInt64, length: UInt64, depth: Int, kind: Kind, hostOffset: UInt64?, compressed: Bool) {
        self.start = start
        self.length = length
        self.depth = depth
        self.kind = kind
        self.hostOffset = hostOffset
        self.compressed = compressed
    }
}

extension GuestImage {
    /// The images of the chain from this one down, top first.
    public var chain: [GuestImage] {
        var out: [GuestImage] = [self]
        var next = backing
        while let image = next {
            out.append(image)
            next = image.backing
        }
        return out
    }

    /// Block status of the chain at `offset`, for up to `maxLength` bytes (clipped to the virtual size).
    public func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus {
        var length = min(maxLength, virtualSize - min(offset, virtualSize))
        precondition(length > 0, "blockStatus past the end of the disk")
        var image: GuestImage = self
        var depth = 0
        while true {
            let ext = try image.layerStatus(at: offset, maxLength: length)
            length = min(length, ext.length)
            switch ext.mapping {
            case .data(let host):
                return BlockStatus(start: offset, length: length, depth: depth, kind: .data, hostOffset: host,
                                   compressed: false)
            case .compressed:
                return BlockStatus(start: offset, length: length, depth: depth, kind: .data, hostOffset: nil,
                                   compressed: true)
            case .zero(let host):
                return BlockStatus(start: offset, length: length, depth: depth, kind: .zero, hostOffset: host,
                                   compressed: false)
            case .unallocated:
                guard let next = image.backing else {
                    return BlockStatus(start: offset, length: length, depth: depth, kind: .unallocated,
                                       hostOffset: ext.unallocatedHost, compressed: false)
                }
                if offset >= next.virtualSize {
                    // Past the end of a shorter backing file: reads as zeros, allocated nowhere.
                    return BlockStatus(start: offset, length: length, depth: depth, kind: .unallocated,
                                       hostOffset: nil, compressed: false)
                }
                length = min(length, next.virtualSize - offset)
                image = next
                depth += 1
            }
        }
    }
}
