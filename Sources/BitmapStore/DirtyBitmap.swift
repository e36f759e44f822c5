import QCowImage

/// An in-memory dirty bitmap over a virtual disk: bit i covers bytes
/// `[i * granularity, (i + 1) * granularity)`.
///
/// Bits live in 64-bit words (bit i is bit i % 64 of word i / 64, so the
/// little-endian bytes of the words are the on-disk bitmap data: bit i is bit
/// i % 8 of byte i / 8). Words are grouped in chunks of 32 KiB that are only
/// allocated once a bit in them is set, so an empty or sparse bitmap of a huge
/// disk costs almost nothing, and a full one costs the bitmap itself
/// (1 TiB at 64 KiB granularity: 2 MiB).
public struct DirtyBitmap: Sendable {
    /// The virtual disk size the bitmap covers.
    public let virtualSize: UInt64
    /// log2 of the granularity.
    public let granularityBits: Int
    /// Number of bits: one per granule, the last one possibly partial.
    public let bitCount: UInt64

    /// Words per chunk (4096 words = 32 KiB = 262144 bits).
    static let chunkShift = 12
    static let chunkWords = 1 << chunkShift
    let wordCount: Int
    /// An empty chunk is all zeros. Bits at or past `bitCount` are always zero.
    var chunks: [[UInt64]]

    /// Bytes of the virtual disk per bit.
    public var granularity: UInt64 { UInt64(1) << UInt64(granularityBits) }

    /// The most bits a bitmap may have: QEMU's limit on bitmap data (512 MiB), in bits.
    public static let maxBitCount = BitmapLimits.maxDataBytes * 8

    /// An empty (all clean) bitmap. Throws `invalidArgument` for a granularity
    /// outside 0...62 or a bitmap larger than QEMU allows (use a coarser granularity).
    public init(virtualSize: UInt64, granularityBits: Int) throws {
        guard (0...62).contains(granularityBits) else {
            throw BitmapError(.invalidArgument, "granularity_bits \(granularityBits) is out of range")
        }
        let granularity = UInt64(1) << UInt64(granularityBits)
        let bits = virtualSize / granularity + (virtualSize % granularity == 0 ? 0 : 1)
        guard bits <= Self.maxBitCount else {
            throw BitmapError(.invalidArgument,
                              "a bitmap of a \(virtualSize)-byte disk at granularity \(granularity) needs \(bits) bits, more than QEMU's limit of \(Self.maxBitCount); use a larger granularity")
        }
        self.virtualSize = virtualSize
        self.granularityBits = granularityBits
        bitCount = bits
        wordCount = Int((bits + 63) / 64)
        chunks = Array(repeating: [], count: (wordCount + Self.chunkWords - 1) / Self.chunkWords)
    }

    /// Bytes of memory the bitmap's words take now.
    public var memoryFootprint: Int { chunks.reduce(0) { $0 + $1.count * 8 } + chunks.count * MemoryLayout<[UInt64]>.stride }

    // MARK: - Byte ranges of the virtual disk

    /// Marks every granule that `range` touches dirty (clipped to the disk).
    public mutating func set(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        setBits(bitRangeTouching(range))
    }

    /// Marks granules clean that `range` covers completely; a granule only
    /// partly covered stays as it is (clearing it would lose a dirty part).
    /// The partial last granule of the disk counts as covered when `range` reaches the disk's end.
    public mutating func clear(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        let g = UInt64(granularityBits)
        let first = (range.lowerBound >> g) + (range.lowerBound & (granularity - 1) == 0 ? 0 : 1)
        let end = range.upperBound >= virtualSize ? bitCount : range.upperBound >> g
        if first < end { clearBits(first..<end) }
    }

    /// Whether any granule that `range` touches is dirty.
    public func isDirty(_ range: Range<UInt64>) -> Bool {
        guard !range.isEmpty else { return false }
        let bits = bitRangeTouching(range)
        guard !bits.isEmpty, let next = nextSetBit(from: bits.lowerBound) else { return false }
        return next < bits.upperBound
    }

    /// Whether the granule holding byte `offset` is dirty.
    public func isDirty(at offset: UInt64) -> Bool {
        guard offset < virtualSize else { return false }
        return testBit(offset >> UInt64(granularityBits))
    }

    /// Marks the whole disk dirty.
    public mutating func setAll() { setBits(0..<bitCount) }

    /// Marks the whole disk clean and releases the words.
    public mutating func clearAll() {
        for c in chunks.indices { chunks[c] = [] }
    }

    /// Whether no bit is set.
    public var isEmpty: Bool { nextSetBit(from: 0) == nil }

    /// Number of dirty bits.
    public var dirtyBitCount: UInt64 {
        var total: UInt64 = 0
        for chunk in chunks where !chunk.isEmpty {
            for word in chunk { total += UInt64(word.nonzeroBitCount) }
        }
        return total
    }

    /// Number of dirty bytes of the disk (the last granule counts only the part inside the disk).
    public var dirtyByteCount: UInt64 {
        var bytes = dirtyBitCount << UInt64(granularityBits)
        let tail = virtualSize & (granularity - 1)
        if tail != 0, bitCount > 0, testBit(bitCount - 1) { bytes -= granularity - tail }
        return bytes
    }

    /// The bits a byte range touches, clipped to the disk.
    func bitRangeTouching(_ range: Range<UInt64>) -> Range<UInt64> {
        let g = UInt64(granularityBits)
        let lower = min(range.lowerBound, virtualSize)
        let upper = min(range.upperBound, virtualSize)
        guard lower < upper else { return 0..<0 }
        let last = (upper - 1) >> g
        return (lower >> g)..<(last + 1)
    }

    // MARK: - Bits

    @inline(__always) func word(_ index: Int) -> UInt64 {
        let chunk = chunks[index >> Self.chunkShift]
        return chunk.isEmpty ? 0 : chunk[index & (Self.chunkWords - 1)]
    }

    @inline(__always) func testBit(_ bit: UInt64) -> Bool {
        bit < bitCount && word(Int(bit >> 6)) & (1 << (bit & 63)) != 0
    }

    /// Words in chunk `c` (the last chunk is short).
    @inline(__always) func wordsInChunk(_ c: Int) -> Int { min(Self.chunkWords, wordCount - (c << Self.chunkShift)) }

    /// The mask of bits `range` covers in word `index`.
    @inline(__always) static func mask(word index: Int, bits range: Range<UInt64>) -> UInt64 {
        let base = UInt64(index) << 6
        let start = max(range.lowerBound, base) - base
        let end = min(range.upperBound, base + 64) - base
        let high: UInt64 = end == 64 ? ~0 : (UInt64(1) << end) - 1
        return high & ~((UInt64(1) << start) - 1)
    }

    /// Calls `body` for each chunk that bits `range` touch, with the chunk's index and the word range in it.
    @inline(__always) func forEachChunk(of range: Range<UInt64>, _ body: (Int, Range<Int>) -> Void) {
        guard range.lowerBound < range.upperBound else { return }
        var w = Int(range.lowerBound >> 6)
        let lastWord = Int((range.upperBound - 1) >> 6)
        while w <= lastWord {
            let c = w >> Self.chunkShift
            let chunkEnd = (c << Self.chunkShift) + wordsInChunk(c)
            let end = min(lastWord + 1, chunkEnd)
            body(c, w..<end)
            w = end
        }
    }

    /// Sets bits `range` (clipped to `bitCount`).
    public mutating func setBits(_ range: Range<UInt64>) {
        let bits = range.clamped(to: 0..<bitCount)
        forEachChunk(of: bits) { c, words in
            let base = c << Self.chunkShift
            if chunks[c].isEmpty { chunks[c] = Array(repeating: 0, count: wordsInChunk(c)) }
            for w in words { chunks[c][w - base] |= Self.mask(word: w, bits: bits) }
        }
    }

    /// Clears bits `range` (clipped to `bitCount`); a chunk cleared completely is released.
    public mutating func clearBits(_ range: Range<UInt64>) {
        let bits = range.clamped(to: 0..<bitCount)
        forEachChunk(of: bits) { c, words in
            guard !chunks[c].isEmpty else { return }
            let base = c << Self.chunkShift
            let chunkFirstBit = UInt64(base) << 6
            let chunkEndBit = min(UInt64(base + wordsInChunk(c)) << 6, bitCount)
            if bits.lowerBound <= chunkFirstBit && bits.upperBound >= chunkEndBit {
                chunks[c] = []
                return
            }
            for w in words { chunks[c][w - base] &= ~Self.mask(word: w, bits: bits) }
        }
    }

    /// The bits of word `index` below `bitCount`.
    @inline(__always) static func validMask(word index: Int, bitCount: UInt64) -> UInt64 {
        mask(word: index, bits: 0..<bitCount)
    }

    /// The first set bit at or after `bit`, or nil.
    public func nextSetBit(from bit: UInt64) -> UInt64? {
        var b = bit
        while b < bitCount {
            let w = Int(b >> 6)
            let c = w >> Self.chunkShift
            let chunk = chunks[c]
            let base = c << Self.chunkShift
            if chunk.isEmpty {
                b = UInt64(base + Self.chunkWords) << 6
                continue
            }
            var i = w - base
            var bits = chunk[i] & (~0 << (b & 63))
            while true {
                if bits != 0 { return UInt64(base + i) << 6 + UInt64(bits.trailingZeroBitCount) }
                i += 1
                if i == chunk.count { break }
                bits = chunk[i]
            }
            b = UInt64(base + chunk.count) << 6
        }
        return nil
    }

    /// The first clear bit at or after `bit`, or `bitCount` if every bit from there is set.
    public func nextClearBit(from bit: UInt64) -> UInt64 {
        var b = bit
        while b < bitCount {
            let w = Int(b >> 6)
            let c = w >> Self.chunkShift
            let chunk = chunks[c]
            let base = c << Self.chunkShift
            if chunk.isEmpty { return b }
            var i = w - base
            var bits = ~chunk[i] & (~0 << (b & 63))
            while true {
                if bits != 0 { return min(bitCount, UInt64(base + i) << 6 + UInt64(bits.trailingZeroBitCount)) }
                i += 1
                if i == chunk.count { break }
                bits = ~chunk[i]
            }
            b = UInt64(base + chunk.count) << 6
        }
        return bitCount
    }
}

extension DirtyBitmap: Equatable {
    /// Same disk size, granularity and bits (an unallocated chunk equals a chunk of zeros).
    public static func == (a: DirtyBitmap, b: DirtyBitmap) -> Bool {
        guard a.virtualSize == b.virtualSize, a.granularityBits == b.granularityBits else { return false }
        for c in a.chunks.indices {
            let x = a.chunks[c], y = b.chunks[c]
            if x.isEmpty && y.isEmpty { continue }
            if x.isEmpty { if y.contains(where: { $0 != 0 }) { return false }; continue }
            if y.isEmpty { if x.contains(where: { $0 != 0 }) { return false }; continue }
            if x != y { return false }
        }
        return true
    }
}
