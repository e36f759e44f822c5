/// A run of the virtual disk whose granules are all dirty or all clean.
public struct DirtyExtent: Equatable, Sendable, CustomStringConvertible {
    /// First byte of the run.
    public var start: UInt64
    /// Length in bytes.
    public var length: UInt64
    /// Whether the run is dirty.
    public var dirty: Bool

    public init(start: UInt64, length: UInt64, dirty: Bool) {
        self.start = start
        self.length = length
        self.dirty = dirty
    }

    /// One past the last byte.
    public var end: UInt64 { start + length }
    public var description: String { "\(start)+\(length) \(dirty ? "dirty" : "clean")" }
}

extension DirtyBitmap {
    /// The runs of equal state covering `range` of the disk (the whole disk by
    /// default) in order, adjacent runs of the same state merged — the extents
    /// `nbdinfo --map=qemu:dirty-bitmap:NAME` shows. Lazy: walking a million
    /// extents allocates nothing.
    public func extents(in range: Range<UInt64>? = nil) -> ExtentSequence {
        let whole = 0..<virtualSize
        return ExtentSequence(bitmap: self, range: range.map { $0.clamped(to: whole) } ?? whole)
    }

    /// The dirty runs only, in order.
    public func dirtyExtents(in range: Range<UInt64>? = nil) -> LazyFilterSequence<ExtentSequence> {
        extents(in: range).lazy.filter(\.dirty)
    }

    /// Sequence of `DirtyExtent`s over a byte range of a bitmap.
    public struct ExtentSequence: Sequence, Sendable {
        let bitmap: DirtyBitmap
        let range: Range<UInt64>

        public func makeIterator() -> Iterator { Iterator(bitmap: bitmap, position: range.lowerBound, end: range.upperBound) }

        public struct Iterator: IteratorProtocol, Sendable {
            let bitmap: DirtyBitmap
            var position: UInt64
            let end: UInt64

            public mutating func next() -> DirtyExtent? {
                guard position < end else { return nil }
                let g = UInt64(bitmap.granularityBits)
                let bit = position >> g
                let dirty = bitmap.testBit(bit)
                let change = dirty ? bitmap.nextClearBit(from: bit + 1) : (bitmap.nextSetBit(from: bit + 1) ?? bitmap.bitCount)
                // change <= bitCount <= 2^32, so change << g cannot overflow for g <= 31;
                // for larger granularities saturate at the disk's end.
                let changeByte = change >= (UInt64.max >> g) ? UInt64.max : change << g
                let stop = Swift.min(changeByte, end)
                defer { position = stop }
                return DirtyExtent(start: position, length: stop - position, dirty: dirty)
            }
        }
    }

    // MARK: - Union and granularity

    /// Marks dirty every byte that is dirty in `other` (`self |= other`).
    /// `other` must cover the same virtual size; its granularity may differ:
    /// each of its dirty runs dirties every granule of `self` it touches, as QEMU's merge does.
    public mutating func formUnion(_ other: DirtyBitmap) throws {
        guard other.virtualSize == virtualSize else {
            throw BitmapError(.invalidArgument,
                              "cannot merge a bitmap of a \(other.virtualSize)-byte disk into one of a \(virtualSize)-byte disk")
        }
        if other.granularityBits == granularityBits {
            for c in other.chunks.indices where !other.chunks[c].isEmpty {
                if chunks[c].isEmpty {
                    chunks[c] = other.chunks[c]
                } else {
                    for i in chunks[c].indices { chunks[c][i] |= other.chunks[c][i] }
                }
            }
        } else {
            for extent in other.dirtyExtents() { set(extent.start..<extent.end) }
        }
    }

    /// The union of `self` and `other` (see `formUnion`).
    public func union(_ other: DirtyBitmap) throws -> DirtyBitmap {
        var copy = self
        try copy.formUnion(other)
        return copy
    }

    /// The same dirty bytes at another granularity: a coarser granule is dirty
    /// when any byte of it was, a finer one when its enclosing granule was.
    public func converted(toGranularityBits bits: Int) throws -> DirtyBitmap {
        if bits == granularityBits { return self }
        var result = try DirtyBitmap(virtualSize: virtualSize, granularityBits: bits)
        try result.formUnion(self)
        return result
    }
}
