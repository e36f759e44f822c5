import QCowImage

/// The on-disk bitmap data: bit i of the bitmap is bit i % 8 of byte i / 8 —
/// qcow2.rst, "Bitmap data". One cluster of data holds `clusterSize * 8` bits.
extension DirtyBitmap {
    /// Number of clusters of data (= bitmap table entries) at `clusterSize`.
    public func dataClusterCount(clusterSize: Int) -> Int {
        let bytes = (bitCount + 7) / 8
        return Int((bytes + UInt64(clusterSize) - 1) / UInt64(clusterSize))
    }

    /// The words data cluster `index` holds.
    func wordRange(ofCluster index: Int, clusterSize: Int) -> Range<Int> {
        let perCluster = clusterSize / 8
        let start = min(index * perCluster, wordCount)
        return start..<min(start + perCluster, wordCount)
    }

    /// Whether data cluster `index` has no set bit (cheap for unallocated chunks).
    public func isClusterEmpty(_ index: Int, clusterSize: Int) -> Bool {
        let words = wordRange(ofCluster: index, clusterSize: clusterSize)
        guard !words.isEmpty else { return true }
        let next = nextSetBit(from: UInt64(words.lowerBound) << 6)
        return next.map { $0 >= UInt64(words.upperBound) << 6 } ?? true
    }

    /// Writes data cluster `index` into `buffer` (`clusterSize` bytes): the
    /// bits as bytes, zeros past the end of the bitmap (the tail bits must be zero).
    public func serializeCluster(_ index: Int, clusterSize: Int, into buffer: UnsafeMutableRawBufferPointer) {
        precondition(buffer.count == clusterSize && clusterSize % 8 == 0)
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        let words = wordRange(ofCluster: index, clusterSize: clusterSize)
        for (i, w) in words.enumerated() {
            let value = word(w)
            if value != 0 { buffer.storeBytes(of: value.littleEndian, toByteOffset: i * 8, as: UInt64.self) }
        }
    }

    /// Replaces the bits of data cluster `index` with `bytes` (the cluster as
    /// read from disk); bits past the end of the bitmap are ignored.
    public mutating func deserializeCluster(_ index: Int, clusterSize: Int, from bytes: UnsafeRawBufferPointer) {
        let words = wordRange(ofCluster: index, clusterSize: clusterSize)
        guard !words.isEmpty else { return }
        let last = words.upperBound - 1
        let lastMask = Self.validMask(word: last, bitCount: bitCount)
        for (i, w) in words.enumerated() {
            var value = i * 8 + 8 <= bytes.count ? UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) : 0
            if w == last { value &= lastMask }
            let c = w >> Self.chunkShift
            if value == 0 {
                if !chunks[c].isEmpty { chunks[c][w & (Self.chunkWords - 1)] = 0 }
                continue
            }
            if chunks[c].isEmpty { chunks[c] = Array(repeating: 0, count: wordsInChunk(c)) }
            chunks[c][w & (Self.chunkWords - 1)] = value
        }
    }

    /// Sets every bit of data cluster `index` (an all-ones table entry).
    public mutating func fillCluster(_ index: Int, clusterSize: Int) {
        let words = wordRange(ofCluster: index, clusterSize: clusterSize)
        guard !words.isEmpty else { return }
        setBits((UInt64(words.lowerBound) << 6)..<(UInt64(words.upperBound) << 6))
    }

    /// Reads the data of a bitmap whose table has been read and validated.
    public static func load(entry: BitmapDirectoryEntry, table: BitmapTable, from device: BlockDevice,
                            virtualSize: UInt64, clusterSize: Int) throws -> DirtyBitmap {
        var bitmap = try DirtyBitmap(virtualSize: virtualSize, granularityBits: entry.granularityBits)
        guard table.entries.count == bitmap.dataClusterCount(clusterSize: clusterSize) else {
            throw BitmapError(.corrupt,
                              "bitmap_table_size \(table.entries.count) does not match the virtual size \(virtualSize) at granularity \(entry.granularity) (expected \(bitmap.dataClusterCount(clusterSize: clusterSize)))",
                              offset: entry.entryOffset.map { $0 + 8 }, region: "bitmap directory", bitmap: entry.name)
        }
        var buffer = [UInt8](repeating: 0, count: clusterSize)
        for (i, tableEntry) in table.entries.enumerated() {
            switch tableEntry.kind {
            case .allZeros:
                continue
            case .allOnes:
                bitmap.fillCluster(i, clusterSize: clusterSize)
            case .data(let offset):
                try buffer.withUnsafeMutableBytes { raw in
                    try bitmapLayer(bitmap: entry.name) { try device.readFully(into: raw, at: offset, region: "bitmap data") }
                    bitmap.deserializeCluster(i, clusterSize: clusterSize, from: UnsafeRawBufferPointer(raw))
                }
            }
        }
        return bitmap
    }
}
