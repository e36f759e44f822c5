/// What the copier reads from: a guest disk's block status and its data by
/// position. A guest image chain satisfies it (every `GuestImage`), and so does
/// a backup source (a local chain with its tracking bitmap, an NBD export).
///
/// The copier reads in plan order from one thread; it names every range it will read
/// before the first read (`willRead`), so a source over a network may keep several
/// reads in flight ahead of the copy, and reads each chunk with `read(exchanging:…)`,
/// so such a source may hand over the buffer it read the chunk into instead of copying it.
public protocol GuestReader: AnyObject {
    /// A name for messages (the image path, or the export's URI).
    var name: String { get }
    var virtualSize: UInt64 { get }
    /// Guest-visible status at `offset` (at least one byte, at most `maxLength`).
    func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus
    /// Reads guest data; past the end reads as zeros.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws
    /// The ranges the copy will read, in this order, before the first read: each is read in
    /// pieces cut where a multiple of `chunk` bytes falls, each piece into a buffer of
    /// `bufferSize` bytes (page aligned) with `read(exchanging:…)`.
    func willRead(_ ranges: [Range<UInt64>], chunk: Int, bufferSize: Int) throws
    /// Reads `count` bytes at `offset` (a piece of the announced plan) into `buffer`, or
    /// returns another buffer of the announced size that holds them at its start and keeps
    /// `buffer` in exchange. Both are allocated with `UnsafeMutableRawBufferPointer.allocate`
    /// (page aligned); each side frees the buffers it ends up with.
    func read(exchanging buffer: UnsafeMutableRawBufferPointer, count: Int, at offset: UInt64) throws
        -> UnsafeMutableRawBufferPointer?
}

extension GuestReader {
    /// A local file reads fast enough when asked.
    public func willRead(_ ranges: [Range<UInt64>], chunk: Int, bufferSize: Int) throws {}

    /// A source without buffers of its own reads into the caller's.
    public func read(exchanging buffer: UnsafeMutableRawBufferPointer, count: Int, at offset: UInt64) throws
        -> UnsafeMutableRawBufferPointer? {
        try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<count]), at: offset)
        return nil
    }

    /// Calls `body` for consecutive extents covering `range` (clipped to the disk).
    public func forEachExtent(in range: Range<UInt64>, _ body: (BlockStatus) throws -> Void) throws {
        var offset = range.lowerBound
        let end = min(range.upperBound, virtualSize)
        while offset < end {
            let status = try blockStatus(at: offset, maxLength: end - offset)
            try body(status)
            offset += status.length
        }
    }
}

extension GuestImage {
    public var name: String { filename }
}

/// One layer of a chain alone, as `qemu-img commit` reads it: what the layer itself
/// allocates is data (read through the layer) or zeros; everything it leaves to its
/// backing file is unallocated.
public final class LayerReader: GuestReader {
    public let layer: GuestImage
    public init(_ layer: GuestImage) { self.layer = layer }
    public var name: String { layer.filename }
    public var virtualSize: UInt64 { layer.virtualSize }

    public func blockStatus(at offset: UInt64, maxLength: UInt64) throws -> BlockStatus {
        let length = min(maxLength, virtualSize - min(offset, virtualSize))
        precondition(length > 0, "blockStatus past the end of the disk")
        let ext = try layer.layerStatus(at: offset, maxLength: length)
        let n = min(length, ext.length)
        switch ext.mapping {
        case .data(let host):
            return BlockStatus(start: offset, length: n, depth: 0, kind: .data, hostOffset: host, compressed: false)
        case .compressed:
            return BlockStatus(start: offset, length: n, depth: 0, kind: .data, hostOffset: nil, compressed: true)
        case .zero(let host):
            return BlockStatus(start: offset, length: n, depth: 0, kind: .zero, hostOffset: host, compressed: false)
        case .unallocated:
            return BlockStatus(start: offset, length: n, depth: 0, kind: .unallocated, hostOffset: nil, compressed: false)
        }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        try layer.read(into: buffer, at: offset)
    }
}
