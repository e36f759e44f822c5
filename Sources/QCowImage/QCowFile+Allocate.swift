/// L2 tables for writing: allocation of missing tables, copy-on-write of
/// tables shared with internal snapshots, and writing changed entries.
extension QCowFile {
    /// The host offset of the L2 table for L1 index `l1Index`, made private to
    /// the active L1 (COPIED) first: a missing table is allocated empty, a shared
    /// one (COPIED clear: referenced by a snapshot too) is copied.
    ///
    /// Steps, and what is on disk if we die after each:
    /// 1. new cluster's refcount and the table contents written, synced — leaked cluster;
    /// 2. L1 entry switched — the new table is in use;
    /// 3. (copy only) synced, old table's refcount dropped — its refcount may stay one too high (leak).
    func writableL2(l1Index: Int) throws -> UInt64 {
        guard l1Index < l1.count else {
            throw QCowError(.corrupt, "L1 table has \(l1.count) entries, the write needs index \(l1Index)",
                            path: filename, offset: header.l1TableOffset, region: "L1 table")
        }
        let entry = L1Entry(rawValue: l1[l1Index])
        if entry.l2Offset != 0 && entry.copied { return entry.l2Offset }
        let newOffset = try allocate(1) << UInt64(clusterBits)
        var contents = [UInt64](repeating: 0, count: clusterSize / 8)
        if entry.l2Offset != 0 { contents = try l2Table(at: entry.l2Offset) }
        try device.writeBytes(encodeTable(contents[...]), at: newOffset)
        try commitRefcounts()
        try syncBarrier()
        l2Cache[newOffset] = contents
        try writeL1Entry(l1Index, L1Entry(l2Offset: newOffset, copied: true).rawValue)
        metadataChanged(added: (newOffset >> UInt64(clusterBits))..<((newOffset >> UInt64(clusterBits)) + 1))
        if entry.l2Offset != 0 {
            try syncBarrier()
            try release(cluster: entry.l2Offset >> UInt64(clusterBits))
            try commitRefcounts()
        }
        noteFileEnd()
        return newOffset
    }

    func writeL1Entry(_ index: Int, _ value: UInt64) throws {
        try device.writeBytes(encodeTable([value][...]), at: header.l1TableOffset + UInt64(index) * 8)
        l1[index] = value
    }

    /// Writes entries `range` (entry indices) of the L2 table at `l2Offset` from
    /// `table` (entry/bitmap pairs for extended L2) and updates the cache.
    func writeL2Entries(_ table: [UInt64], at l2Offset: UInt64, range: ClosedRange<Int>) throws {
        let perEntry = extendedL2 ? 2 : 1
        let slice = table[(range.lowerBound * perEntry)..<((range.upperBound + 1) * perEntry)]
        try device.writeBytes(encodeTable(slice), at: l2Offset + UInt64(range.lowerBound * perEntry * 8))
        l2Cache[l2Offset] = table
    }

    /// Drops the references an L2 entry holds (data cluster or compressed range), if any.
    func releaseEntry(_ raw: UInt64) throws {
        let cluster = decodeL2(entry: raw, bitmap: 0)
        if case .compressed(let host, let sectors) = cluster.kind {
            try releaseCompressed(host: host, sectors: sectors)
        } else if let host = cluster.host, host != 0 {
            try releaseData(cluster: host >> UInt64(clusterBits))
        }
    }

    /// Drops a guest data reference to `cluster`. A data reference to a cluster that holds
    /// metadata means the image is corrupt: dropping it could free the metadata's cluster
    /// for reuse, so this refuses instead (nothing written; no more writes this session).
    func releaseData(cluster: UInt64) throws {
        if try metadataClusterSet().contains(cluster) {
            let error = QCowError(.corrupt, "cluster 0x\(String(cluster << UInt64(clusterBits), radix: 16)) is referenced as guest data but holds metadata (run 'qbackup check --repair all')",
                                  path: filename, offset: cluster << UInt64(clusterBits), region: "L2 table")
            writeFailure = error
            throw error
        }
        try release(cluster: cluster)
    }

    /// Writes the changed entries of one L2 table after the data and refcounts
    /// they point at are durable, then frees what the old entries referenced.
    ///
    /// 1. refcount changes written, synced (data was written before the call);
    /// 2. L2 entries written;
    /// 3. if anything is to be freed: synced, then refcounts dropped (a crash leaks them).
    func switchEntries(l2Offset: UInt64, table: [UInt64], changed: ClosedRange<Int>?, release old: [UInt64],
                       barrier: Bool = true) throws {
        guard let changed else { return }
        try commitRefcounts()
        if barrier { try syncBarrier() }
        try writeL2Entries(table, at: l2Offset, range: changed)
        if !old.isEmpty {
            try syncBarrier()
            for raw in old { try releaseEntry(raw) }
            try commitRefcounts()
        }
    }
}
