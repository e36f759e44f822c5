/// Host cluster allocation and freeing: finds free clusters (refcount 0, or
/// not described by any refcount block), creates refcount blocks and grows
/// the refcount table as the file grows, and writes refcount changes in an
/// order that leaves at worst leaked clusters after a crash:
///
/// 1. new and changed refcount blocks are written;
/// 2. sync, then the refcount table entries that point at new blocks;
/// 3. the caller syncs before writing any L1/L2 entry that points at the clusters.
extension QCowFile {
    // MARK: - Public API for metadata owners (BitmapStore)

    /// Allocates `count` contiguous host clusters with refcount 1 and returns the
    /// offset of the first. The refcount update is written and synced before this
    /// returns, so the caller may write the clusters and then point at them.
    public func allocateClusters(_ count: Int) throws -> UInt64 {
        precondition(count > 0, "allocateClusters needs a positive count")
        try checkWritable()
        return try guarded {
            let first = try allocate(count)
            try commitRefcounts()
            try syncBarrier()
            return first << UInt64(clusterBits)
        }
    }

    /// Decrements the refcount of `count` clusters from `offset` (a cluster is
    /// free when it reaches 0). Call only after no durable pointer refers to them
    /// (write the new pointer, `flush()`, then free). The change is written, not synced.
    public func freeClusters(at offset: UInt64, count: Int) throws {
        precondition(offset & UInt64(clusterSize - 1) == 0, "freeClusters needs a cluster-aligned offset")
        try checkWritable()
        try guarded {
            for i in 0..<UInt64(count) { try release(cluster: (offset >> UInt64(clusterBits)) + i) }
            try commitRefcounts()
        }
    }

    /// The refcount of the host cluster holding byte `offset` of the image file.
    public func refcount(ofHostOffset offset: UInt64) throws -> UInt64 {
        try refcounts().get(offset >> UInt64(clusterBits))
    }

    // MARK: - Internal allocation

    /// The refcount structures, loaded on first use.
    func refcounts() throws -> RefcountTable {
        if let table = refcountTable { return table }
        let table = try RefcountTable(device: device, header: header, fileSize: fileSize)
        refcountTable = table
        return table
    }

    /// Finds `count` contiguous free clusters, makes the refcount blocks that
    /// describe them, and sets their refcounts to 1 in memory. Returns the
    /// first cluster index. Nothing is written except by refcount table growth.
    func allocate(_ count: Int) throws -> UInt64 {
        let table = try refcounts()
        let perBlock = UInt64(table.entriesPerBlock)
        var extra = 0
        while true {
            let start = try findFree(count + extra)
            let end = start + UInt64(count + extra)
            let firstBlock = Int(start / perBlock)
            let lastBlock = Int((end - 1) / perBlock)
            if lastBlock >= table.entries.count {
                try growRefcountTable(toCover: lastBlock)
                continue
            }
            let missing = (firstBlock...lastBlock).reduce(0) { $0 + (table.entries[$1] == 0 ? 1 : 0) }
            if missing > extra {
                // New blocks go right after the data; search again with room for them.
                extra = missing
                continue
            }
            // A "free" cluster that holds metadata means the refcounts are corrupt: allocating
            // it would overwrite the metadata. Nothing is written yet, so refuse and leave the
            // file as it is (no corrupt bit: bad input never causes a write); this image takes
            // no more writes in this session.
            let metadata = try metadataClusterSet()
            if let hit = (start..<end).first(where: { metadata.contains($0) }) {
                let error = QCowError(.corrupt, "cluster 0x\(String(hit << UInt64(clusterBits), radix: 16)) has refcount 0 but holds metadata (run 'qbackup check --repair all')",
                                      path: filename, offset: hit << UInt64(clusterBits), region: "refcount block")
                writeFailure = error
                throw error
            }
            var next = start + UInt64(count)
            for index in firstBlock...lastBlock where table.entries[index] == 0 {
                _ = table.createBlock(index, at: next << UInt64(clusterBits))
                next += 1
            }
            for cluster in start..<next { try table.set(cluster, 1) }
            if table.freeHint == start { table.freeHint = next }
            metadataChanged(added: (start + UInt64(count))..<next)
            return start
        }
    }

    /// The first run of `count` free clusters at or after the free hint.
    func findFree(_ count: Int) throws -> UInt64 {
        let table = try refcounts()
        let perBlock = UInt64(table.entriesPerBlock)
        // Move the hint over clusters in use, so later searches start later.
        while try table.get(table.freeHint) != 0 { table.freeHint += 1 }
        var start = table.freeHint
        var run: UInt64 = 0
        var cluster = start
        while run < UInt64(count) {
            let blockIndex = Int(cluster / perBlock)
            if blockIndex >= table.entries.count || table.entries[blockIndex] == 0 {
                // No block: every cluster it would describe is free.
                let blockEnd = (UInt64(blockIndex) + 1) * perBlock
                run += blockEnd - cluster
                cluster = blockEnd
                continue
            }
            if try table.get(cluster) == 0 {
                run += 1
            } else {
                run = 0
                start = cluster + 1
            }
            cluster += 1
        }
        return start
    }

    /// Drops one reference to `cluster`; at 0 the cluster is free for reuse (and, if it held
    /// metadata, no longer does). Guest data references go through `releaseData`.
    func release(cluster: UInt64) throws {
        let left = try refcounts().adjust(cluster, by: -1)
        if left == 0 {
            if let tail = compressedTail, tail >> UInt64(clusterBits) == cluster { compressedTail = nil }
            // Freed metadata: the set is rebuilt from the structures when next needed, so a
            // cluster still referenced elsewhere (a refcount too low: corruption) stays in it.
            if metadataClusters?.contains(cluster) == true { metadataClusters = nil }
            l2Cache[cluster << UInt64(clusterBits)] = nil
        }
        decompressedHost = nil
    }

    /// Drops the references a compressed descriptor holds: one on every cluster its sectors touch.
    func releaseCompressed(host: UInt64, sectors: Int) throws {
        let first = (host & ~511) >> UInt64(clusterBits)
        let last = ((host & ~511) + UInt64(sectors) * 512 - 1) >> UInt64(clusterBits)
        for cluster in first...last { try releaseData(cluster: cluster) }
    }

    /// Writes pending refcount changes: blocks, then (after a sync, when a new
    /// block must become reachable) the table entries that point at new blocks.
    /// The caller syncs before anything points at newly allocated clusters.
    func commitRefcounts() throws {
        guard let table = refcountTable, table.hasChanges else { return }
        try table.writeDirtyBlocks()
        if !table.dirtyEntries.isEmpty {
            // New blocks are durable before the table points at them.
            try syncBarrier()
            try table.writeDirtyEntries()
        }
        noteFileEnd()
    }

    // MARK: - Growing the refcount table

    /// Replaces the refcount table with a bigger one that has an entry for
    /// block `index`. The new table and the blocks describing it go past the
    /// area the old table covers (and past the end of the file), so until the
    /// header switches to the new table nothing on disk refers to them.
    func growRefcountTable(toCover index: Int) throws {
        let table = try refcounts()
        // Pending changes go to disk first: the new table copies the entries.
        try commitRefcounts()
        let cs = UInt64(clusterSize)
        let perBlock = UInt64(table.entriesPerBlock)
        let oldCount = table.entries.count
        let covered = UInt64(oldCount) * perBlock
        let areaStart = max(covered, (fileSize + cs - 1) / cs)  // cluster index
        var newCount = max(index + 1, oldCount + max(1, oldCount / 2))
        var tableClusters = 0
        var blockCount = 0
        while true {
            tableClusters = (newCount * 8 + clusterSize - 1) / clusterSize
            // Blocks needed to describe [areaStart, areaStart + blocks + table).
            var blocks = 1
            while true {
                let end = areaStart + UInt64(blocks + tableClusters)
                let need = Int((end - 1) / perBlock - areaStart / perBlock) + 1
                if need <= blocks { break }
                blocks = need
            }
            blockCount = blocks
            let lastIndex = Int((areaStart + UInt64(blockCount + tableClusters) - 1) / perBlock)
            if lastIndex < newCount { break }
            newCount = lastIndex + 1
        }
        guard UInt64(tableClusters) * cs <= QCowHeader.Limits.maxRefcountTableBytes else {
            throw QCowError(.unsupported, "the refcount table would exceed QEMU's limit of 8 MiB (the image is too large for cluster_size \(clusterSize) and refcount_bits \(1 << table.order))",
                            path: filename, region: "refcount table")
        }
        logger.debug("growing refcount table", metadata: ["entries": "\(newCount)", "clusters": "\(tableClusters)"])

        // Step 1: new refcount blocks describing the area, each cluster of the area at refcount 1.
        let firstIndex = Int(areaStart / perBlock)
        var newBlocks: [(Int, RefcountBlock)] = []
        for k in 0..<blockCount {
            let idx = firstIndex + k
            let b = RefcountBlock(offset: (areaStart + UInt64(k)) * cs, bytes: [UInt8](repeating: 0, count: clusterSize))
            newBlocks.append((idx, b))
        }
        let areaEnd = areaStart + UInt64(blockCount + tableClusters)
        for cluster in areaStart..<areaEnd {
            let b = newBlocks[Int(cluster / perBlock) - firstIndex].1
            b.set(order: table.order, index: Int(cluster % perBlock), value: 1)
        }
        for (_, b) in newBlocks {
            try device.writeBytes(b.bytes, at: b.offset)
            b.dirty = nil
        }
        // Step 2: the new table: old entries, plus the new blocks.
        var entries = table.entries + [UInt64](repeating: 0, count: newCount - oldCount)
        for (idx, b) in newBlocks { entries[idx] = b.offset }
        let newTableOffset = (areaStart + UInt64(blockCount)) * cs
        var tableBytes = encodeTable(entries[...])
        tableBytes += [UInt8](repeating: 0, count: tableClusters * clusterSize - tableBytes.count)
        try device.writeBytes(tableBytes, at: newTableOffset)
        noteFileEnd(newTableOffset + UInt64(tableBytes.count))
        // Step 3: sync, then switch the header to the new table (rewriteHeader syncs).
        // If we die before the switch, the new clusters lie outside what the old table describes.
        try syncBarrier()
        let oldOffset = table.tableOffset
        let oldClusters = table.tableClusters
        try rewriteHeader { h in
            h.refcountTableOffset = newTableOffset
            h.refcountTableClusters = UInt32(tableClusters)
        }
        table.entries = entries
        table.tableOffset = newTableOffset
        table.tableClusters = tableClusters
        for (idx, b) in newBlocks { table.adoptBlock(idx, b) }
        // Step 4: free the old table; a crash before this is written leaks it.
        for i in 0..<UInt64(oldClusters) { try release(cluster: (oldOffset >> UInt64(clusterBits)) + i) }
        metadataClusters = nil
    }

    /// Records that the file now reaches at least `end` bytes (with no argument: asks the device).
    func noteFileEnd(_ end: UInt64? = nil) {
        let size = end ?? ((try? device.size()) ?? fileSize)
        if size > fileSize { fileSize = size }
        if dataDevice === device { dataFileSize = fileSize }
    }

    /// Adds newly allocated metadata clusters to the overlap-check set.
    func metadataChanged(added clusters: Range<UInt64>) {
        guard metadataClusters != nil else { return }
        for c in clusters { metadataClusters?.insert(c) }
    }
}
