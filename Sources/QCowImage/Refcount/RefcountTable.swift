/// The refcount table and the refcount blocks it points to, held in memory
/// for a writable image.
///
/// On disk: `refcount_table_clusters` clusters of big-endian u64 entries at
/// `refcount_table_offset`; each entry is 0 (no block: every refcount it
/// would hold is 0) or the cluster-aligned offset of a refcount block —
/// qcow2.rst, "Host cluster management".
///
/// Changes are made in memory and remembered as dirty (block byte spans and
/// table entries); `QCowFile.commitRefcounts()` writes them in the safe order.
final class RefcountTable {
    let device: BlockDevice
    let clusterSize: Int
    let clusterBits: Int
    let order: Int
    let entriesPerBlock: Int
    let maxValue: UInt64

    /// Entries of the table (raw values; offsets validated when loaded).
    var entries: [UInt64]
    var tableOffset: UInt64
    var tableClusters: Int
    /// Table indices changed since they were last written.
    var dirtyEntries: Set<Int> = []
    /// Blocks read or created, by table index.
    private var blocks: [Int: RefcountBlock] = [:]
    /// Indices of blocks with unwritten changes.
    var dirtyBlocks: Set<Int> = []
    /// Blocks created in memory whose table entry is not yet on disk.
    var newBlocks: Set<Int> = []
    /// Cache budget for clean blocks.
    let budgetBlocks: Int
    /// No cluster below this index is free (a search starts here).
    var freeHint: UInt64 = 0

    /// Loads the table of `header` from `device`, validating every entry.
    init(device: BlockDevice, header: QCowHeader, fileSize: UInt64) throws {
        self.device = device
        clusterSize = header.clusterSize
        clusterBits = Int(header.clusterBits)
        order = Int(header.refcountOrder)
        entriesPerBlock = RefcountCodec.entriesPerBlock(clusterSize: clusterSize, order: order)
        maxValue = RefcountCodec.maxValue(order: order)
        tableOffset = header.refcountTableOffset
        tableClusters = Int(header.refcountTableClusters)
        budgetBlocks = max(16, (16 << 20) / clusterSize)
        let start = header.refcountTableOffset
        var raw = [UInt8](repeating: 0, count: Int(header.refcountTableClusters) << header.clusterBits)
        try raw.withUnsafeMutableBytes { try device.readZeroFilling(into: $0, at: start) }
        entries = decodeTable(raw)
        let clusterSize = header.clusterSize
        for (i, value) in entries.enumerated() where value != 0 {
            let entry = RefcountTableEntry(rawValue: value)
            let at = start + UInt64(i) * 8
            guard entry.reservedBits == 0 else {
                throw QCowError(.corrupt, "refcount table entry \(i) has reserved bits set (0x\(String(value, radix: 16)))",
                                path: device.name, offset: at, region: "refcount table")
            }
            guard entry.blockOffset & UInt64(clusterSize - 1) == 0 else {
                throw QCowError(.corrupt, "refcount block offset 0x\(String(entry.blockOffset, radix: 16)) is not cluster aligned (refcount table index \(i))",
                                path: device.name, offset: at, region: "refcount table")
            }
            guard entry.blockOffset < fileSize else {
                throw QCowError(.corrupt, "refcount block at 0x\(String(entry.blockOffset, radix: 16)) lies past the end of the file (refcount table index \(i))",
                                path: device.name, offset: at, region: "refcount table")
            }
        }
    }

    /// Bytes of the host file that one refcount block describes.
    var bytesPerBlock: UInt64 { UInt64(entriesPerBlock) << UInt64(clusterBits) }

    /// The block at table index `index`, read on first use; nil when the entry is 0 or past the table.
    func block(_ index: Int) throws -> RefcountBlock? {
        if let b = blocks[index] { return b }
        guard index < entries.count else { return nil }
        let offset = RefcountTableEntry(rawValue: entries[index]).blockOffset
        guard offset != 0 else { return nil }
        if blocks.count >= budgetBlocks { evictClean() }
        var bytes = [UInt8](repeating: 0, count: clusterSize)
        try bytes.withUnsafeMutableBytes { try device.readZeroFilling(into: $0, at: offset) }
        let b = RefcountBlock(offset: offset, bytes: bytes)
        blocks[index] = b
        return b
    }

    /// Registers a block made in memory (zeroed, wholly dirty) for table index `index` at `offset`.
    func createBlock(_ index: Int, at offset: UInt64) -> RefcountBlock {
        let b = RefcountBlock(offset: offset, bytes: [UInt8](repeating: 0, count: clusterSize))
        b.markAllDirty()
        blocks[index] = b
        dirtyBlocks.insert(index)
        newBlocks.insert(index)
        entries[index] = offset
        dirtyEntries.insert(index)
        return b
    }

    /// Adopts a block that is already written (made by table growth).
    func adoptBlock(_ index: Int, _ block: RefcountBlock) { blocks[index] = block }

    /// The refcount of host cluster `cluster` (0 where no block exists).
    func get(_ cluster: UInt64) throws -> UInt64 {
        let index = Int(cluster / UInt64(entriesPerBlock))
        guard let b = try block(index) else { return 0 }
        return b.get(order: order, index: Int(cluster % UInt64(entriesPerBlock)))
    }

    /// Sets the refcount of `cluster`, whose block must exist.
    func set(_ cluster: UInt64, _ value: UInt64) throws {
        let index = Int(cluster / UInt64(entriesPerBlock))
        guard let b = try block(index) else {
            preconditionFailure("refcount block for cluster \(cluster) must be allocated before setting its refcount")
        }
        b.set(order: order, index: Int(cluster % UInt64(entriesPerBlock)), value: value)
        dirtyBlocks.insert(index)
        if value == 0 { freeHint = min(freeHint, cluster) }
    }

    /// Adds `delta` (+1 or -1) to the refcount of `cluster`, refusing overflow and underflow.
    func adjust(_ cluster: UInt64, by delta: Int) throws -> UInt64 {
        let old = try get(cluster)
        let offset = cluster << UInt64(clusterBits)
        if delta > 0 {
            guard old < maxValue else {
                throw QCowError(.unsupported, "refcount of cluster 0x\(String(offset, radix: 16)) would exceed \(maxValue) (refcount_bits \(1 << order))",
                                path: device.name, offset: offset, region: "refcount block")
            }
            try set(cluster, old + 1)
            return old + 1
        }
        guard old > 0 else {
            throw QCowError(.corrupt, "refcount of cluster 0x\(String(offset, radix: 16)) is already 0 and cannot be decreased",
                            path: device.name, offset: offset, region: "refcount block")
        }
        try set(cluster, old - 1)
        return old - 1
    }

    /// Whether any change waits to be written.
    var hasChanges: Bool { !dirtyBlocks.isEmpty || !dirtyEntries.isEmpty }

    /// Writes the changed spans of refcount blocks (not the table).
    func writeDirtyBlocks() throws {
        for index in dirtyBlocks.sorted() {
            guard let b = blocks[index], let span = b.dirty else { continue }
            try b.bytes.withUnsafeBytes { raw in
                try device.write(UnsafeRawBufferPointer(rebasing: raw[span]), at: b.offset + UInt64(span.lowerBound))
            }
            b.dirty = nil
        }
        dirtyBlocks.removeAll(keepingCapacity: true)
    }

    /// Writes changed table entries, coalescing neighbours into one write.
    func writeDirtyEntries() throws {
        let sorted = dirtyEntries.sorted()
        var i = 0
        while i < sorted.count {
            var j = i
            while j + 1 < sorted.count && sorted[j + 1] == sorted[j] + 1 { j += 1 }
            let bytes = encodeTable(entries[sorted[i]...sorted[j]])
            try device.writeBytes(bytes, at: tableOffset + UInt64(sorted[i]) * 8)
            i = j + 1
        }
        dirtyEntries.removeAll(keepingCapacity: true)
        newBlocks.removeAll(keepingCapacity: true)
    }

    /// Drops clean blocks from memory when the cache is over budget.
    private func evictClean() {
        for (index, b) in blocks where b.dirty == nil && !dirtyBlocks.contains(index) {
            blocks[index] = nil
        }
    }

    /// Host offsets of every refcount block, for the overlap check.
    var blockOffsets: [UInt64] {
        entries.compactMap { $0 == 0 ? nil : RefcountTableEntry(rawValue: $0).blockOffset }
    }
}
