/// Zero writes and discards: metadata-only where the format allows (zero
/// flag on v3, subcluster zero bits on extended L2, deallocation where
/// nothing shows through), real zeros through the data path elsewhere.
extension QCowFile {
    /// Makes `[offset, offset+length)` read as zeros. Whole clusters (whole
    /// subclusters with extended L2) get the zero flag (v3) or are deallocated
    /// (v2 without a backing file) and their old clusters freed; partial ones,
    /// and v2 images with a backing file, get zeros written.
    public func writeZeroes(at offset: UInt64, length: UInt64) throws {
        try checkWritable()
        try checkGuestRange(offset, length)
        guard length > 0 else { return }
        writeObserver?(offset..<(offset + length), .zero)
        let end = offset + length
        let metadataOnly = header.version >= 3 || backing == nil
        let unit = UInt64(metadataOnly ? subclusterSize : clusterSize)
        // The cluster that holds the end of the disk counts as whole when the range reaches the end.
        let wholeStart = (offset + unit - 1) / unit * unit
        let wholeEnd = end == virtualSize ? (end + unit - 1) / unit * unit : end / unit * unit
        try guarded {
            if !metadataOnly || wholeStart >= wholeEnd {
                try writeRealZeros(offset, end)
                return
            }
            try writeRealZeros(offset, min(wholeStart, end))
            try forEachBatch(wholeStart..<wholeEnd, needsTable: true) { cluster, mask, entry, bitmap in
                if header.version < 3 {
                    return (0, 0, true)
                }
                if !extendedL2 { return (L2Entry.zeroFlag, 0, true) }
                let all = mask == UInt32.max
                if all { return (0, L2Bitmap(allocated: 0, zero: UInt32.max).rawValue, true) }
                let cluster = decodeL2(entry: entry, bitmap: bitmap)
                if case .compressed = cluster.kind { return nil }  // handled with real zeros below
                return (entry, L2Bitmap(allocated: cluster.bitmap.allocated & ~mask, zero: cluster.zeroUnits | mask).rawValue, false)
            } fallback: { start, end in
                try writeRealZeros(start, end)
            }
            try writeRealZeros(wholeEnd, end)
        }
    }

    /// Discards whole clusters of `[offset, offset+length)` (partial clusters are
    /// left alone, as QEMU does, except the last cluster of the disk): they read
    /// as zeros afterwards, except on v2 images with a backing file, where the
    /// backing file shows through. Their host clusters are freed.
    public func discard(at offset: UInt64, length: UInt64) throws {
        try checkWritable()
        try checkGuestRange(offset, length)
        guard length > 0 else { return }
        writeObserver?(offset..<(offset + length), .discard)
        let cs = UInt64(clusterSize)
        let end = offset + length
        let start = (offset + cs - 1) / cs * cs
        let stop = end == virtualSize ? (end + cs - 1) / cs * cs : end / cs * cs
        guard start < stop else { return }
        let hideBacking = header.version >= 3 && backing != nil
        try guarded {
            try forEachBatch(start..<stop, needsTable: hideBacking) { _, _, _, _ in
                if !hideBacking { return (0, 0, true) }
                return extendedL2 ? (0, L2Bitmap(allocated: 0, zero: UInt32.max).rawValue, true) : (L2Entry.zeroFlag, 0, true)
            } fallback: { _, _ in }
        }
    }

    /// Writes zeros through the data path.
    func writeRealZeros(_ start: UInt64, _ end: UInt64) throws {
        var pos = start
        while pos < end {
            let n = Int(min(end - pos, UInt64(max(clusterSize, 1 << 20))))
            let zeros = [UInt8](repeating: 0, count: n)
            try zeros.withUnsafeBytes { z in
                var done = 0
                var hosts: Set<UInt64> = []
                while done < n {
                    let m = batchLength(at: pos + UInt64(done), remaining: n - done)
                    try writeBatch(UnsafeRawBufferPointer(rebasing: z[done..<(done + m)]), at: pos + UInt64(done), hosts: &hosts)
                    done += m
                }
            }
            pos += UInt64(n)
        }
    }

    /// Rewrites the L2 entries of whole units in `range`, one L2 table at a time.
    /// `change` gets the cluster's guest offset, the mask of units in range, and
    /// the old entry and bitmap; it returns the new entry and bitmap and whether
    /// the old entry's clusters are to be freed, or nil to hand the cluster's part
    /// of the range to `fallback`.
    func forEachBatch(_ range: Range<UInt64>, needsTable: Bool,
                      change: (UInt64, UInt32, UInt64, UInt64) throws -> (UInt64, UInt64, Bool)?,
                      fallback: (UInt64, UInt64) throws -> Void) throws {
        decompressedHost = nil
        let cs = UInt64(clusterSize)
        let unit = UInt64(subclusterSize)
        var pos = range.lowerBound
        while pos < range.upperBound {
            let l1Index = Int(pos / bytesPerL2)
            let batchEnd = min(range.upperBound, (UInt64(l1Index) + 1) * bytesPerL2)
            defer { pos = batchEnd }
            let existing = l1Index < l1.count ? L1Entry(rawValue: l1[l1Index]).l2Offset : 0
            if existing == 0 && !needsTable { continue }
            let l2Offset = try writableL2(l1Index: l1Index)
            var table = try l2Table(at: l2Offset)
            var changed: ClosedRange<Int>?
            var old: [UInt64] = []
            var fallbacks: [(UInt64, UInt64)] = []
            var cluster = pos & ~(cs - 1)
            while cluster < batchEnd {
                let index = Int((cluster / cs) & UInt64(l2EntryCount - 1))
                let lo = max(pos, cluster)
                let hi = min(batchEnd, cluster + cs)
                let mask = extendedL2 ? unitMask(from: Int((lo - cluster) / unit), through: Int((hi - cluster - 1) / unit)) : 1
                let entry = extendedL2 ? table[2 * index] : table[index]
                let bitmap = extendedL2 ? table[2 * index + 1] : 0
                if let (newEntry, newBitmap, free) = try change(cluster, mask, entry, bitmap) {
                    if newEntry != entry || newBitmap != bitmap {
                        if extendedL2 {
                            table[2 * index] = newEntry
                            table[2 * index + 1] = newBitmap
                        } else {
                            table[index] = newEntry
                        }
                        changed = changed.map { min($0.lowerBound, index)...max($0.upperBound, index) } ?? index...index
                        let was = decodeL2(entry: entry, bitmap: bitmap)
                        let now = decodeL2(entry: newEntry, bitmap: newBitmap)
                        let keepsHost = was.host != nil && now.host == was.host
                        if free && was.holdsHostClusters && !keepsHost {
                            old.append(entry)
                        }
                    }
                } else {
                    fallbacks.append((lo, hi))
                }
                cluster += cs
            }
            try switchEntries(l2Offset: l2Offset, table: table, changed: changed, release: old, barrier: false)
            for (lo, hi) in fallbacks { try fallback(lo, hi) }
        }
    }
}
