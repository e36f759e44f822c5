/// Guest data writes: any offset and length. Writes are cut into batches
/// inside one L2 table; per batch, clusters that can be written in place are,
/// the others get new host clusters (one contiguous allocation), partial
/// (sub)clusters are filled with the old guest contents, and the data goes
/// out in as few large writes as host contiguity allows. Then one barrier,
/// then the L2 entries, then (after another barrier) the old clusters are freed.
extension QCowFile {
    /// The largest batch assembled in memory at once.
    static let maxBatchBytes = 8 << 20

    /// Writes `buffer` at guest offset `offset`.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try checkWritable()
        try checkGuestRange(offset, UInt64(buffer.count))
        guard buffer.count > 0 else { return }
        writeObserver?(offset..<(offset + UInt64(buffer.count)), .data)
        try guarded {
            var done = 0
            var hosts: Set<UInt64> = []
            while done < buffer.count {
                let pos = offset + UInt64(done)
                let n = batchLength(at: pos, remaining: buffer.count - done)
                try writeBatch(UnsafeRawBufferPointer(rebasing: buffer[done..<(done + n)]), at: pos, hosts: &hosts)
                done += n
            }
        }
    }

    /// Bytes from `pos` up to the end of its L2 table or the batch limit.
    func batchLength(at pos: UInt64, remaining: Int) -> Int {
        let l2End = (pos / bytesPerL2 + 1) * bytesPerL2
        let cs = UInt64(clusterSize)
        let limit = (pos & ~(cs - 1)) + UInt64(max(clusterSize, Self.maxBatchBytes))
        return Int(min(UInt64(remaining), l2End - pos, limit - pos))
    }

    /// The plan for one guest cluster of a batch.
    struct ClusterPlan {
        var index = 0
        var guest: UInt64 = 0
        /// Bytes of the cluster the caller's buffer covers, and where they start in it.
        var userLo = 0, userHi = 0, userOffset = 0
        var host: UInt64 = 0
        var fresh = false
        /// Bytes of the cluster written to `host`.
        var spanLo = 0, spanHi = 0
        /// Units (subclusters, or the one cluster) that hold data after the write.
        var allocated: UInt32 = 0
        var newEntry: UInt64 = 0, newBitmap: UInt64 = 0
        var oldEntry: UInt64 = 0
    }

    /// Writes a batch inside one L2 table. `hosts` collects the host clusters this
    /// write has used so far: two guest clusters on one host cluster (a cross-link in
    /// damaged metadata) would make one overwrite the other, so that is refused.
    func writeBatch(_ data: UnsafeRawBufferPointer, at pos: UInt64, hosts: inout Set<UInt64>) throws {
        decompressedHost = nil
        let cs = clusterSize
        let unit = subclusterSize
        let units = extendedL2 ? 32 : 1
        let allUnits: UInt32 = extendedL2 ? UInt32.max : 1
        let l2Offset = try writableL2(l1Index: Int(pos / bytesPerL2))
        var table = try l2Table(at: l2Offset)
        let first = pos & ~UInt64(cs - 1)
        let count = Int((pos + UInt64(data.count) - first + UInt64(cs) - 1) / UInt64(cs))
        var plans = [ClusterPlan](repeating: ClusterPlan(), count: count)
        var freshCount = 0

        // 1. Decide, per cluster, where the data goes and which bytes to write.
        for k in 0..<count {
            var p = ClusterPlan()
            p.guest = first + UInt64(k * cs)
            p.index = Int((p.guest >> UInt64(clusterBits)) & UInt64(l2EntryCount - 1))
            p.userLo = k == 0 ? Int(pos - first) : 0
            p.userHi = min(cs, Int(pos + UInt64(data.count) - p.guest))
            p.userOffset = Int(p.guest + UInt64(p.userLo) - pos)
            let raw = extendedL2 ? table[2 * p.index] : table[p.index]
            let cluster = decodeL2(entry: raw, bitmap: extendedL2 ? table[2 * p.index + 1] : 0)
            p.oldEntry = raw
            let touched = unitMask(from: p.userLo / unit, through: (p.userHi - 1) / unit)
            let full = unitMask(from: (p.userLo + unit - 1) / unit, through: p.userHi / unit - 1)
            let oldData = cluster.dataUnits
            let compressed: Bool
            if case .compressed = cluster.kind { compressed = true } else { compressed = false }
            if let host = cluster.host, host != 0, cluster.entry.copied {
                // In place: the cluster is ours alone. An entry the read path refuses
                // (unaligned, past the end of the file, an invalid bitmap) is refused here too.
                _ = try validatedMapping(cluster, subcluster: 0,
                                         entryOffset: l2Offset + UInt64(p.index * header.l2EntrySize))
                p.host = host
                p.allocated = oldData | touched
                if touched & ~full & ~oldData == 0 {
                    p.spanLo = p.userLo
                    p.spanHi = p.userHi
                } else {
                    p.spanLo = (p.userLo / unit) * unit
                    p.spanHi = ((p.userHi + unit - 1) / unit) * unit
                }
            } else {
                // A new cluster, keeping what the old one held.
                p.fresh = true
                freshCount += 1
                p.allocated = compressed ? allUnits : (oldData | touched)
                p.spanLo = p.allocated.trailingZeroBitCount * unit
                p.spanHi = (units - (extendedL2 ? p.allocated.leadingZeroBitCount : 0)) * unit
            }
            if extendedL2 {
                let zero = compressed ? 0 : cluster.zeroUnits & ~p.allocated
                p.newBitmap = L2Bitmap(allocated: p.allocated, zero: zero).rawValue
            }
            plans[k] = p
        }

        // 2. One contiguous allocation for every new cluster.
        if freshCount > 0 {
            var next = try allocate(freshCount) << UInt64(clusterBits)
            for k in 0..<count where plans[k].fresh {
                plans[k].host = next
                next += UInt64(cs)
            }
        }
        for k in 0..<count {
            plans[k].newEntry = L2Entry.data(host: plans[k].host, copied: true).rawValue
            try checkDataOverlap(host: plans[k].host + UInt64(plans[k].spanLo), length: plans[k].spanHi - plans[k].spanLo)
            guard hosts.insert(plans[k].host).inserted else {
                let error = QCowError(.corrupt, "host cluster 0x\(String(plans[k].host, radix: 16)) is mapped by two guest clusters (run 'qbackup check --repair all')",
                                      path: filename, offset: l2Offset + UInt64(plans[k].index * header.l2EntrySize),
                                      region: "L2 table")
                writeFailure = error
                throw error
            }
        }

        // 3. Assemble: old contents around partial units, then the caller's bytes. A cluster
        // whose written span is exactly the caller's bytes goes out straight from them.
        let direct = plans.map { $0.spanLo == $0.userLo && $0.spanHi == $0.userHi }
        let buffer = scratch.reserve(count * cs)
        for k in 0..<count where !direct[k] {
            let p = plans[k]
            let slot = UnsafeMutableRawBufferPointer(rebasing: buffer[(k * cs)..<((k + 1) * cs)])
            var u = p.spanLo / unit
            while u * unit < p.spanHi {
                let lo = max(u * unit, p.spanLo)
                let hi = min((u + 1) * unit, p.spanHi)
                if lo < p.userLo || hi > p.userHi {
                    if p.allocated & (1 << UInt32(u)) != 0 {
                        if lo < p.userLo {
                            try read(into: UnsafeMutableRawBufferPointer(rebasing: slot[lo..<min(hi, p.userLo)]),
                                     at: p.guest + UInt64(lo))
                        }
                        if hi > p.userHi {
                            let from = max(lo, p.userHi)
                            try read(into: UnsafeMutableRawBufferPointer(rebasing: slot[from..<hi]), at: p.guest + UInt64(from))
                        }
                    } else {
                        UnsafeMutableRawBufferPointer(rebasing: slot[lo..<hi]).initializeMemory(as: UInt8.self, repeating: 0)
                    }
                }
                u += 1
            }
            UnsafeMutableRawBufferPointer(rebasing: slot[p.userLo..<p.userHi])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: data[p.userOffset..<(p.userOffset + p.userHi - p.userLo)]))
        }

        // 4. Data out, coalescing clusters that are contiguous on the host.
        var k = 0
        var fileEnd: UInt64 = 0
        while k < count {
            var j = k
            while j + 1 < count && plans[j].spanHi == cs && plans[j + 1].spanLo == 0
                && plans[j + 1].host == plans[j].host + UInt64(cs) && direct[j + 1] == direct[k] { j += 1 }
            let lo = k * cs + plans[k].spanLo
            let hi = j * cs + plans[j].spanHi
            // A direct run's bytes are contiguous in the caller's buffer, as its clusters are in the guest.
            let bytes = direct[k]
                ? UnsafeRawBufferPointer(rebasing: data[plans[k].userOffset..<(plans[k].userOffset + hi - lo)])
                : UnsafeRawBufferPointer(rebasing: buffer[lo..<hi])
            try dataDevice.write(bytes, at: plans[k].host + UInt64(plans[k].spanLo))
            fileEnd = max(fileEnd, plans[j].host + UInt64(cs))
            k = j + 1
        }
        // A new cluster written only in part still lies wholly inside the file.
        if fileEnd > (try dataDevice.size()) { try dataDevice.resize(to: fileEnd) }
        noteFileEnd()

        // 5. Entries, after a barrier; old clusters freed after another.
        var changed: ClosedRange<Int>?
        var old: [UInt64] = []
        for p in plans {
            let perEntry = extendedL2 ? 2 : 1
            let same = table[perEntry * p.index] == p.newEntry && (!extendedL2 || table[2 * p.index + 1] == p.newBitmap)
            if same { continue }
            table[perEntry * p.index] = p.newEntry
            if extendedL2 { table[2 * p.index + 1] = p.newBitmap }
            changed = changed.map { min($0.lowerBound, p.index)...max($0.upperBound, p.index) } ?? p.index...p.index
            if p.fresh && decodeL2(entry: p.oldEntry, bitmap: 0).holdsHostClusters { old.append(p.oldEntry) }
        }
        try switchEntries(l2Offset: l2Offset, table: table, changed: changed, release: old)
    }

    /// Bits `from...through` set (empty when through < from).
    @inline(__always) func unitMask(from: Int, through: Int) -> UInt32 {
        guard through >= from else { return 0 }
        let width = through - from + 1
        let bits: UInt32 = width >= 32 ? UInt32.max : (UInt32(1) << UInt32(width)) - 1
        return bits << UInt32(from)
    }
}
