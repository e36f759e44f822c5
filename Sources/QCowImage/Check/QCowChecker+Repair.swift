// MARK: - Repair

extension QCowChecker {
    /// Sets stored refcounts to the computed ones where `mode` allows: leaks
    /// (refcount too high) with `.leaks`, every difference with `.all`. Fixes in
    /// place when every affected refcount block exists; otherwise (`.all` only)
    /// writes a whole new refcount structure and switches the header to it.
    /// Returns whether anything was written.
    mutating func repair(mode: RepairMode) throws -> Bool {
        var fixes: [(cluster: UInt64, value: UInt64)] = []
        var missingBlock = false
        for c in 0..<nbClusters {
            let want = UInt64(computed[Int(c)])
            let have = try stored.refcount(ofCluster: c)
            guard have != want else { continue }
            if have > want || mode == .all {
                fixes.append((c, want))
                if !stored.hasValidBlock(forCluster: c) { missingBlock = true }
            }
        }
        if mode == .all && (missingBlock || needsRebuild || refcountBlockOverlap || !stored.tableIsSound) {
            try rebuildRefcounts()
            try fixCopiedFlags()
            return true
        }
        guard !fixes.isEmpty else {
            return mode == .all ? try fixCopiedFlags() : false
        }
        let maxValue = RefcountCodec.maxValue(order: stored.order)
        var blockIndex = -1
        var block: [UInt8] = []
        func flush() throws {
            guard blockIndex >= 0, !block.isEmpty else { return }
            try image.device.writeBytes(block, at: stored.table[blockIndex].blockOffset)
        }
        for fix in fixes {
            let index = Int(fix.cluster / stored.entriesPerBlock)
            guard stored.hasValidBlock(forCluster: fix.cluster) else { continue }
            if index != blockIndex {
                try flush()
                blockIndex = index
                block = try image.device.readBytes(image.clusterSize, at: stored.table[index].blockOffset, region: "refcount block")
            }
            block.withUnsafeMutableBytes {
                _ = RefcountCodec.set($0, order: stored.order, index: Int(fix.cluster % stored.entriesPerBlock),
                                      value: min(fix.value, maxValue))
            }
        }
        try flush()
        try image.device.sync()
        if mode == .all { try fixCopiedFlags() }
        return true
    }

    /// Sets OFLAG_COPIED on active L1 and L2 entries exactly where the (repaired)
    /// refcount is 1, as QEMU's repair does. Returns whether anything changed.
    @discardableResult
    mutating func fixCopiedFlags() throws -> Bool {
        var refcounts = try StoredRefcounts(image: image)
        let cs = clusterSize
        let fileSize = try image.device.size()
        var changed = false
        let l1Offset = image.header.l1TableOffset
        for (i, raw) in image.l1.enumerated() where raw != 0 {
            let entry = L1Entry(rawValue: raw)
            let l2 = entry.l2Offset
            guard l2 != 0, l2 & (cs - 1) == 0, l2 < fileSize, fileSize - l2 >= cs else { continue }
            let wantCopied = try refcounts.refcount(ofCluster: l2 / cs) == 1
            if entry.copied != wantCopied {
                let fixed = wantCopied ? raw | L1Entry.copiedFlag : raw & ~L1Entry.copiedFlag
                try image.device.writeBytes(encodeTable([fixed][...]), at: l1Offset + UInt64(i) * 8)
                image.l1[i] = fixed
                changed = true
            }
            let extended = image.extendedL2
            let step = extended ? 2 : 1
            var table = decodeTable(try image.device.readBytes(Int(cs), at: l2, region: "L2 table"))
            var tableChanged = false
            for j in stride(from: 0, to: table.count, by: step) {
                let cluster = image.decodeL2(entry: table[j], bitmap: 0)
                let e = cluster.entry
                guard let host = cluster.host, host != 0, !cluster.unalignedHost, host < fileSize,
                      !image.header.incompatibleFeatures.contains(.externalDataFile)
                else { continue }
                let want = try refcounts.refcount(ofCluster: host / cs) == 1
                if e.copied != want {
                    table[j] = want ? e.rawValue | L2Entry.copiedFlag : e.rawValue & ~L2Entry.copiedFlag
                    tableChanged = true
                }
            }
            if tableChanged {
                try image.device.writeBytes(encodeTable(table[...]), at: l2)
                changed = true
            }
        }
        if changed {
            try image.device.sync()
            image.dropCaches()
        }
        return changed
    }

    /// Writes a fresh refcount table and blocks after the end of the file, covering
    /// every cluster (themselves included) with the computed refcounts, then
    /// switches the header to them. The old structures become free clusters.
    mutating func rebuildRefcounts() throws {
        let cs = clusterSize
        let perBlock = stored.entriesPerBlock
        // The old refcount table and blocks are no longer referenced once we switch.
        var refs = computed
        func drop(_ offset: UInt64, _ length: UInt64) {
            guard length > 0 else { return }
            var c = offset / cs
            // Offsets come from the file: one near 2^64 must not overflow.
            let (end, overflow) = offset.addingReportingOverflow(length - 1)
            let last = overflow ? UInt64.max : end / cs
            while c <= last && c < UInt64(refs.count) {
                if refs[Int(c)] > 0 { refs[Int(c)] -= 1 }
                c += 1
            }
        }
        let h = image.header
        drop(h.refcountTableOffset, UInt64(h.refcountTableClusters) * cs)
        for entry in stored.table where entry.rawValue != 0 && entry.blockOffset & (cs - 1) == 0 {
            drop(entry.blockOffset, cs)
        }
        // Size the new structures so they describe themselves too.
        let start = nbClusters
        var blocks: UInt64 = 0
        var tableClusters: UInt64 = 1
        while true {
            let total = start + blocks + tableClusters
            let needBlocks = (total + perBlock - 1) / perBlock
            let needTable = max(1, (needBlocks * 8 + cs - 1) / cs)
            if needBlocks == blocks && needTable == tableClusters { break }
            blocks = needBlocks
            tableClusters = needTable
        }
        guard tableClusters * cs <= QCowHeader.Limits.maxRefcountTableBytes else {
            throw QCowError(.unsupported, "a rebuilt refcount table would exceed 8 MiB", path: image.filename)
        }
        let total = start + blocks + tableClusters
        refs += [UInt32](repeating: 1, count: Int(blocks + tableClusters))
        let maxValue = RefcountCodec.maxValue(order: stored.order)
        var tableBytes = [UInt8](repeating: 0, count: Int(tableClusters * cs))
        for b in 0..<blocks {
            var block = [UInt8](repeating: 0, count: Int(cs))
            let first = b * perBlock
            block.withUnsafeMutableBytes { raw in
                for i in 0..<perBlock where first + i < total {
                    let value = UInt64(refs[Int(first + i)])
                    if value > 0 { RefcountCodec.set(raw, order: stored.order, index: Int(i), value: min(value, maxValue)) }
                }
            }
            let blockOffset = (start + b) * cs
            try image.device.writeBytes(block, at: blockOffset)
            tableBytes.withUnsafeMutableBytes { BigEndian.store64($0, Int(b), blockOffset) }
        }
        let tableOffset = (start + blocks) * cs
        try image.device.writeBytes(tableBytes, at: tableOffset)
        try image.device.sync()
        // One header write switches to the new structures.
        try image.rewriteHeader { header in
            header.refcountTableOffset = tableOffset
            header.refcountTableClusters = UInt32(tableClusters)
        }
    }
}

extension StoredRefcounts {
    /// Whether cluster `c` is described by a refcount block that exists and is valid.
    func hasValidBlock(forCluster c: UInt64) -> Bool {
        let index = Int(c / entriesPerBlock)
        guard index < table.count else { return false }
        let block = table[index].blockOffset
        let cs = UInt64(image.clusterSize)
        return block != 0 && block & (cs - 1) == 0 && block < fileSize && fileSize - block >= cs
    }

    /// Whether the whole refcount table could be read.
    var tableIsSound: Bool {
        UInt64(table.count) * 8 == UInt64(image.header.refcountTableClusters) * UInt64(image.clusterSize)
    }
}

extension QCowFile {
    /// Forgets cached tables and refcounts after another component repaired metadata.
    public func dropCachesAfterRepair() { dropCaches() }

    /// Forgets cached tables and refcounts (after a repair rewrote them behind the caches).
    func dropCaches() {
        l2Cache.removeAll()
        refcountTable = nil
        decompressedHost = nil
        if let size = try? device.size() { fileSize = size }
    }

    /// Forgets a snapshot table that runs past the end of the file (nothing of it can be read;
    /// QEMU's repair drops the overhanging entries too): nb_snapshots and snapshots_offset
    /// become 0, and what the table's snapshots held becomes leaks that the repair frees.
    func dropDamagedSnapshotTable() throws {
        try rewriteHeader {
            $0.nbSnapshots = 0
            $0.snapshotsOffset = 0
        }
        snapshots = []
        snapshotTableDamage = nil
    }

    /// Clears the corrupt and dirty bits once a repair left the image consistent.
    func clearCorruptAndDirtyBits() throws {
        let bits: IncompatibleFeatures = [.corrupt, .dirty]
        guard !header.incompatibleFeatures.isDisjoint(with: bits) else { return }
        try rewriteHeader { $0.incompatibleFeatures.subtract(bits) }
    }
}
