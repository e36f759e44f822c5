/// One extent of `qemu-img map --output=json`: start, length, depth,
/// present, zero, data, and offset when the data (or a preallocated zero
/// cluster) has a known host location.
public struct MapExtent: Equatable, Sendable {
    public var start: UInt64
    public var length: UInt64
    public var depth: Int
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    public var offset: UInt64?
    /// The file the offset refers to (for the human format).
    public var filename: String?

    public init(_ status: BlockStatus, filename: String?) {
        start = status.start
        length = status.length
        depth = status.depth
        present = status.present
        zero = status.kind != .data
        data = status.kind == .data
        offset = status.hostOffset
        self.filename = offset == nil ? nil : filename
    }

    /// Whether `next` directly continues this extent with the same properties.
    public func merges(with next: MapExtent) -> Bool {
        guard next.start == start + length, next.depth == depth, next.present == present,
              next.zero == zero, next.data == data, next.filename == filename
        else { return false }
        switch (offset, next.offset) {
        case (nil, nil): return true
        case (let a?, let b?): return b == a + length
        default: return false
        }
    }
}

extension GuestImage {
    /// The allocation map of the whole disk, adjacent equal extents merged, streamed to `body`.
    public func forEachMapExtent(_ body: (MapExtent) throws -> Void) throws {
        let layers = chain
        var pending: MapExtent?
        func push(_ ext: MapExtent) throws {
            if let current = pending, current.merges(with: ext) {
                pending?.length += ext.length
            } else {
                if let current = pending { try body(current) }
                pending = ext
            }
        }
        try forEachExtent(in: 0..<virtualSize) { status in
            let layer = status.depth < layers.count ? layers[status.depth] : nil
            let file = layer?.dataFilename
            if status.kind == .data, let host = status.hostOffset, let q = layer as? QCowFile,
               try q.isMetadataPreallocated()
            {
                // QEMU looks through to the host file and reports its holes as zeros.
                var start = status.start
                var at = host
                for (length, zero) in try q.hostHolePieces(host: host, length: status.length) {
                    var piece = status
                    piece.start = start
                    piece.length = length
                    piece.hostOffset = at
                    var ext = MapExtent(piece, filename: file)
                    ext.zero = zero
                    try push(ext)
                    start += length
                    at += length
                }
            } else {
                try push(MapExtent(status, filename: file))
            }
        }
        if let current = pending { try body(current) }
    }

    /// The file that host offsets of this layer refer to.
    public var dataFilename: String {
        if let q = self as? QCowFile { return q.dataDevice.name }
        return filename
    }
}
