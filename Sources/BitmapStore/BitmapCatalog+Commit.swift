import QCowImage

/// A run of contiguous host clusters.
struct ClusterRun: Equatable {
    var offset: UInt64
    var count: Int
}

/// What one bitmap update will write and free.
final class CommitPlan {
    /// The directory after the update.
    var entries: [BitmapDirectoryEntry]
    /// Clusters allocated for the new state (freed again if the update fails before the switch).
    var allocated: [ClusterRun] = []
    /// Clusters of the old state, freed once the new state is durable.
    var obsolete: [ClusterRun] = []

    init(entries: [BitmapDirectoryEntry]) { self.entries = entries }

    func index(of name: String) -> Int? {
        let bytes = Array(name.utf8)
        return entries.firstIndex { $0.nameBytes == bytes }
    }
}

// MARK: - Public operations

extension BitmapCatalog {
    /// The granularity QEMU picks for a new bitmap: the cluster size, clamped to 4 KiB...64 KiB.
    public var defaultGranularity: UInt64 { UInt64(min(max(geometry.clusterSize, 4096), 65536)) }

    /// Refuses a granularity QEMU refuses: a power of two from 512 B to 2 GiB (granularity_bits 9-31).
    public static func validateGranularity(_ granularity: UInt64) throws {
        guard granularity.nonzeroBitCount == 1,
              BitmapLimits.granularityBits.contains(granularity.trailingZeroBitCount) else {
            throw BitmapError(.invalidArgument, "granularity \(granularity) must be a power of two from 512 to 2 GiB")
        }
    }

    /// Adds an empty bitmap (`qemu-img bitmap --add`), enabled unless `enabled` is false.
    public func add(_ name: String, granularity: UInt64? = nil, enabled: Bool = true) throws {
        try requireVersion3(for: "add a bitmap")
        // A bitmap of a 0-byte disk would have an empty bitmap table (bitmap_table_size 0),
        // which QEMU refuses to open (and cannot write either): refuse before writing anything.
        guard geometry.virtualSize > 0 else {
            throw BitmapError(.unsupported, "the disk is 0 bytes: a persistent bitmap needs at least one bitmap table entry (bitmap_table_size 0 is invalid); grow the disk first",
                              path: file.filename, bitmap: name)
        }
        let granularity = granularity ?? defaultGranularity
        do {
            try Self.validateGranularity(granularity)
        } catch var error as BitmapError {
            error.path = file.filename
            error.bitmap = name
            throw error
        }
        if let problem = BitmapLimits.problem(withNewName: name) {
            throw BitmapError(.invalidArgument, "\(problem) (name_size, name)", path: file.filename, bitmap: name)
        }
        let bitmap = try DirtyBitmap(virtualSize: geometry.virtualSize, granularityBits: granularity.trailingZeroBitCount)
        try update { plan in
            guard plan.index(of: name) == nil else {
                throw BitmapError(.invalidArgument, "a bitmap named '\(name)' already exists", path: file.filename, bitmap: name)
            }
            guard plan.entries.count < BitmapLimits.maxBitmaps else {
                throw BitmapError(.invalidArgument, "the image already has \(BitmapLimits.maxBitmaps) bitmaps, QEMU's limit",
                                  path: file.filename, bitmap: name)
            }
            let table = try writeBitmap(bitmap, plan: plan)
            var flags: BitmapFlags = enabled ? .auto : []
            if enabled && isTracking { flags.insert(.inUse) }
            plan.entries.append(BitmapDirectoryEntry(name: name, flags: flags, granularityBits: bitmap.granularityBits,
                                                     tableOffset: table.offset, tableSize: table.entries.count))
        } after: {
            if enabled && isTracking { tracked[name] = bitmap }
        }
    }

    /// Removes a bitmap and frees its clusters (`qemu-img bitmap --remove`).
    /// Allowed for an inconsistent bitmap.
    public func remove(_ name: String) throws {
        let entry = try requireEntry(name)
        try update { plan in
            // A stale extension was dropped by `update` as a whole; nothing left to do.
            guard let index = plan.index(of: name) else { return }
            plan.obsolete += clustersOwned(by: entry)
            plan.entries.remove(at: index)
        } after: {
            tracked[name] = nil
        }
    }

    /// Marks every byte clean (`qemu-img bitmap --clear`): the table becomes all-zeros entries.
    public func clear(_ name: String) throws {
        let entry = try requireConsistent(name, for: "clear it")
        if var live = tracked[name] {
            live.clearAll()
            tracked[name] = live
            return
        }
        try replaceData(of: entry, with: try DirtyBitmap(virtualSize: geometry.virtualSize, granularityBits: entry.granularityBits))
    }

    /// Sets the auto flag: the bitmap tracks writes (`qemu-img bitmap --enable`).
    public func enable(_ name: String) throws {
        try requireVersion3(for: "enable a bitmap")
        let entry = try requireConsistent(name, for: "enable it")
        guard !entry.isEnabled else { return }
        let live = isTracking ? try loadFromDisk(entry) : nil
        try update { plan in
            guard let index = plan.index(of: name) else { return }
            plan.entries[index].flags.insert(.auto)
            if live != nil { plan.entries[index].flags.insert(.inUse) }
        } after: {
            if let live { tracked[name] = live }
        }
    }

    /// Clears the auto flag: the bitmap stops tracking writes (`qemu-img bitmap --disable`).
    public func disable(_ name: String) throws {
        let entry = try requireConsistent(name, for: "disable it")
        guard entry.isEnabled else { return }
        let live = tracked[name]
        try update { plan in
            guard let index = plan.index(of: name) else { return }
            if let live {
                // Store what was tracked in memory; the entry's in_use flag goes with it.
                plan.obsolete += clustersOwned(by: entry)
                let table = try writeBitmap(live, plan: plan)
                plan.entries[index].tableOffset = table.offset
                plan.entries[index].tableSize = table.entries.count
                plan.entries[index].flags.remove(.inUse)
            }
            plan.entries[index].flags.remove(.auto)
        } after: {
            tracked[name] = nil
        }
    }

    /// `target |= source` for every source bitmap in this image (`qemu-img bitmap --merge`).
    public func merge(into target: String, sources names: [String]) throws {
        let bitmaps = try names.map { try load($0) }
        try merge(into: target, bitmaps: bitmaps)
    }

    /// `target |= source` for every source bitmap, which may come from another
    /// image of the same virtual size and have any granularity.
    public func merge(into target: String, bitmaps sources: [DirtyBitmap]) throws {
        let entry = try requireConsistent(target, for: "merge into it")
        var bitmap = try load(target)
        for source in sources {
            do { try bitmap.formUnion(source) } catch let error as BitmapError { throw error.inFile(file.filename).forBitmap(target) }
        }
        try store(entry, bitmap)
    }

    /// Replaces the contents of bitmap `name` with `bitmap` (same virtual size;
    /// converted to the bitmap's granularity if it differs).
    public func store(_ name: String, _ bitmap: DirtyBitmap) throws {
        try store(try requireConsistent(name, for: "store it"), bitmap)
    }

    func store(_ entry: BitmapDirectoryEntry, _ bitmap: DirtyBitmap) throws {
        guard bitmap.virtualSize == geometry.virtualSize else {
            throw BitmapError(.invalidArgument, "the bitmap covers \(bitmap.virtualSize) bytes, the image \(geometry.virtualSize)",
                              path: file.filename, bitmap: entry.name)
        }
        let converted = try bitmap.converted(toGranularityBits: entry.granularityBits)
        if tracked[entry.name] != nil {
            tracked[entry.name] = converted
            return
        }
        try replaceData(of: entry, with: converted)
    }

    // MARK: - Steps

    func requireVersion3(for operation: String) throws {
        guard file.header.version >= 3 else {
            throw BitmapError(.unsupported, "cannot \(operation): persistent bitmaps need a qcow2 version 3 image (compat=1.1)",
                              path: file.filename, offset: 4, region: "header")
        }
    }

    /// Writes new data and table for `entry` and switches to them.
    func replaceData(of entry: BitmapDirectoryEntry, with bitmap: DirtyBitmap) throws {
        try update { plan in
            guard let index = plan.index(of: entry.name) else { return }
            plan.obsolete += clustersOwned(by: entry)
            let table = try writeBitmap(bitmap, plan: plan)
            plan.entries[index].tableOffset = table.offset
            plan.entries[index].tableSize = table.entries.count
        }
    }

    /// Runs one crash-safe update: `body` writes new tables and data into newly
    /// allocated clusters and edits `plan.entries`; then `commit` writes the new
    /// directory, makes it durable, switches the header to it, and frees the old
    /// clusters. `after` updates memory once the switch is done. If anything fails
    /// before the switch, the new clusters are freed (best effort; at worst they
    /// leak) and the image is as before.
    ///
    /// An extension whose autoclear bit is cleared is stale: like QEMU opening
    /// such an image for writing, the update drops it (its clusters leak; we
    /// cannot trust them to be ours) and starts from no bitmaps.
    func update(_ body: (CommitPlan) throws -> Void, after: () -> Void = {}) throws {
        guard file.writable else {
            throw BitmapError(.refused, "the image is open read-only", path: file.filename)
        }
        let stale = bitmapsExtension != nil && !autoclearBitSet || staleDirectoryError != nil
        let plan = CommitPlan(entries: stale ? [] : entries)
        if !stale, let ext = bitmapsExtension {
            plan.obsolete.append(ClusterRun(offset: ext.directoryOffset, count: clusters(forBytes: ext.directorySize)))
        }
        do {
            try bitmapLayer {
                try body(plan)
                try commit(plan)
            }
        } catch {
            for run in plan.allocated { try? file.freeClusters(at: run.offset, count: run.count) }
            try? file.flush()
            throw (error as? BitmapError)?.inFile(file.filename) ?? error
        }
        after()
    }

    /// Step 1: data clusters and table of `bitmap`, in clusters allocated in one
    /// run. Empty regions get all-zeros entries and no data cluster.
    func writeBitmap(_ bitmap: DirtyBitmap, plan: CommitPlan) throws -> BitmapTable {
        let clusterSize = file.clusterSize
        let count = bitmap.dataClusterCount(clusterSize: clusterSize)
        let used = (0..<count).filter { !bitmap.isClusterEmpty($0, clusterSize: clusterSize) }
        let tableClusters = clusters(forBytes: count * 8)
        let first = try file.allocateClusters(used.count + tableClusters)
        plan.allocated.append(ClusterRun(offset: first, count: used.count + tableClusters))
        var entries = Array(repeating: BitmapTableEntry.allZeros, count: count)
        var buffer = [UInt8](repeating: 0, count: clusterSize)
        for (n, index) in used.enumerated() {
            let offset = first + UInt64(n) * UInt64(clusterSize)
            try buffer.withUnsafeMutableBytes { raw in
                bitmap.serializeCluster(index, clusterSize: clusterSize, into: raw)
                try file.device.write(UnsafeRawBufferPointer(raw), at: offset)
            }
            entries[index] = .data(at: offset)
        }
        let table = BitmapTable(offset: first + UInt64(used.count) * UInt64(clusterSize), entries: entries)
        try file.device.writeBytes(table.encoded(), at: table.offset)
        return table
    }

    /// Steps 2-5: new directory to new clusters → flush → one header update
    /// (extension and autoclear bit) → free the old clusters.
    func commit(_ plan: CommitPlan) throws {
        var newExtension: BitmapsExtension?
        if !plan.entries.isEmpty {
            let raws = plan.entries.map(\.raw)
            let bytes = BitmapDirectory.encode(raws)
            guard bytes.count <= BitmapLimits.maxDirectoryBytes else {
                throw BitmapError(.invalidArgument, "the bitmap directory would exceed \(BitmapLimits.maxDirectoryBytes) bytes")
            }
            let directoryClusters = clusters(forBytes: bytes.count)
            let offset = try file.allocateClusters(directoryClusters)
            plan.allocated.append(ClusterRun(offset: offset, count: directoryClusters))
            try file.device.writeBytes(bytes, at: offset)
            newExtension = BitmapsExtension(count: plan.entries.count, directorySize: bytes.count, directoryOffset: offset)
            var position = offset
            for (i, raw) in raws.enumerated() {
                plan.entries[i].entryOffset = position
                position += UInt64(raw.encodedSize)
            }
        }
        // On disk now: the old state, plus unreferenced new clusters (leaks at worst).
        try file.flush()
        try file.rewriteHeader { header in
            if let newExtension {
                header.setExtension(HeaderExtension.bitmaps, newExtension.raw.encoded())
                header.autoclearFeatures.insert(.bitmaps)
            } else {
                header.setExtension(HeaderExtension.bitmaps, nil)
                header.autoclearFeatures.remove(.bitmaps)
            }
        }
        // On disk now: the new state (rewriteHeader syncs); the old clusters are unreferenced.
        plan.allocated = []
        entries = plan.entries
        bitmapsExtension = newExtension
        autoclearBitSet = newExtension != nil
        staleDirectoryError = nil
        try free(plan.obsolete)
        try file.flush()
    }

    /// Frees runs of clusters, skipping any whose refcount is already 0 (a
    /// damaged image must not have its refcounts driven below zero).
    func free(_ runs: [ClusterRun]) throws {
        let clusterSize = UInt64(geometry.clusterSize)
        for run in runs where run.count > 0 {
            var start: UInt64?
            var length = 0
            for i in 0..<run.count {
                let offset = run.offset + UInt64(i) * clusterSize
                if try file.refcount(ofHostOffset: offset) > 0 {
                    if start == nil { start = offset }
                    length += 1
                    continue
                }
                if let s = start { try file.freeClusters(at: s, count: length) }
                start = nil
                length = 0
            }
            if let s = start { try file.freeClusters(at: s, count: length) }
        }
    }

    /// The table and data clusters of `entry`, as far as they can be trusted:
    /// a table that fails validation frees nothing but itself's directory slot (its clusters leak).
    func clustersOwned(by entry: BitmapDirectoryEntry) -> [ClusterRun] {
        guard let table = try? table(of: entry) else { return [] }
        var runs = [ClusterRun(offset: entry.tableOffset, count: clusters(forBytes: entry.tableSize * 8))]
        for case .data(let offset) in table.entries.map(\.kind) {
            if let last = runs.last, runs.count > 1, last.offset + UInt64(last.count) * UInt64(geometry.clusterSize) == offset {
                runs[runs.count - 1].count += 1
            } else {
                runs.append(ClusterRun(offset: offset, count: 1))
            }
        }
        return runs
    }

    func clusters(forBytes bytes: Int) -> Int { (bytes + geometry.clusterSize - 1) / geometry.clusterSize }
}
