import Logging
import QCowImage

/// Retention: folds the points a policy does not keep (`RetentionPolicy`: the newest N,
/// and by calendar) into the next kept point, keeping every remaining point in time
/// restorable to the same bytes, under the same index.
///
/// A fold of the layers `from..<k` into k (the oldest ones: from = 0) works as follows; in the
/// middle of the chain, "full layer" below reads "layer `from`" when no full layer lies between,
/// and k keeps standing on the layer before `from`. The new oldest layer k must stand alone. When it is already full, the older
/// files just leave the manifest. Otherwise the layers after k's full layer, up
/// to k, are committed into that full layer's file in place (as `qemu-img commit`
/// does: only their clusters are written), which makes it point k:
///
/// 1. the manifest records the pending merge (`into`: the full layer's file);
/// 2. each layer's own clusters are written into the full layer's file. Every point
///    from k on reads the same bytes throughout (the clusters written are covered by
///    a newer layer in their chains); only the points being dropped change, so a
///    crash here leaves the remaining points intact and the next run commits again;
/// 3. the file is synced and hashed, and the manifest records the checksum;
/// 4. the file is renamed over layer k's file (so layer k+1's backing name still fits);
/// 5. the manifest drops the folded layers; then their files are removed.
///
/// When the layers differ in virtual size (the disk grew), or the full layer's file
/// has other hard links (a `cp -al` copy of the repository, which must keep restoring
/// what it held), point k is written as a new standalone file instead and swapped in
/// the same way (steps 3-5): no existing file is written.
///
/// Before step 1 records anything, merge takes a writer's image locks on every layer it
/// folds (a point that a VM or qemu-nbd holds open makes it refuse) and checks the
/// checksum of every layer it reads: a refused merge leaves nothing behind.
/// `recover` finishes an interrupted merge (or undoes one that wrote a new file).
public enum MergeEngine {
    public struct Result: Sendable {
        public var folded: Int
        public var remaining: Int
        public var bytesWritten: UInt64
        /// The points kept and the points that went (or, with `dryRun`, would go), by stable index.
        public var kept: [Int] = []
        public var dropped: [Int] = []
        /// Why each kept point stays (the rules that keep it), by stable index.
        public var reasons: [Int: [String]] = [:]
        /// Each point's creation time as recorded (ISO 8601), by stable index.
        public var created: [Int: String] = [:]
        /// The 4 MiB chunks of the merged layer files hashed for their new checksums: an in-place
        /// merge hashes only the chunks it wrote (the others keep the digests checked before).
        public var chunksHashed = 0
        /// The 4 MiB chunks of in-place merges' base files read to check them before the merge
        /// wrote (only those it may write; the newer layers are checked whole).
        public var chunksChecked = 0
    }

    public static func merge(repository: String, keep: Int, logger: Logger = Logger(label: "qbackup.merge"),
                             progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        guard keep >= 1 else { throw ChainError(.invalidArgument, "--keep must be at least 1") }
        return try merge(repository: repository, policy: RetentionPolicy(last: keep), logger: logger, progress: progress)
    }

    /// Retention by `policy`: every point it does not keep is folded into the next kept point
    /// (a run of points that go, oldest run first, one crash-safe merge each), so every kept
    /// point restores to the same bytes and keeps its index. `dryRun` decides and changes nothing.
    public static func merge(repository: String, policy: RetentionPolicy, dryRun: Bool = false,
                             logger: Logger = Logger(label: "qbackup.merge"),
                             progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        let counts = [policy.last, policy.daily, policy.weekly, policy.monthly].compactMap { $0 }
        guard !counts.isEmpty else {
            throw ChainError(.invalidArgument, "merge needs a rule: --keep, --keep-daily, --keep-weekly or --keep-monthly")
        }
        guard counts.allSatisfy({ $0 >= 1 }) else { throw ChainError(.invalidArgument, "every --keep count must be at least 1") }
        let repo = try BackupRepository(path: repository, exclusive: !dryRun)
        try repo.refuseReplica("merge")
        try repo.requireIntact()
        if dryRun {
            if repo.manifest?.pendingMerge != nil {
                throw ChainError(.refused, "a merge was interrupted; run 'qbackup merge' without --dry-run to finish it first",
                                 path: repository)
            }
        } else {
            try recover(repo, logger: logger)
            try repo.removeLeftovers()
        }
        guard let manifest = repo.manifest, !manifest.layers.isEmpty else {
            return Result(folded: 0, remaining: 0, bytesWritten: 0)
        }
        let decision = try decide(policy, manifest.layers)
        var result = Result(folded: 0, remaining: manifest.layers.count, bytesWritten: 0, kept: decision.kept,
                            dropped: decision.dropped, reasons: decision.reasons,
                            created: Dictionary(manifest.layers.map { ($0.index, $0.created) }) { first, _ in first })
        if dryRun { return result }
        let going = Set(decision.dropped)
        while let current = repo.manifest, let start = current.layers.firstIndex(where: { going.contains($0.index) }) {
            // The run of points that go ends just before a kept point (the newest is always kept).
            guard let target = current.layers[start...].firstIndex(where: { !going.contains($0.index) }) else {
                throw ChainError(.invalidArgument, "retention would drop the newest point", path: repository)
            }
            let folded = try fold(repo, current, from: start, into: target, logger: logger, progress: progress)
            result.bytesWritten += folded.bytes
            result.chunksHashed += folded.chunksHashed
            result.chunksChecked += folded.chunksChecked ?? 0
            result.folded += target - start
        }
        result.remaining = repo.manifest?.layers.count ?? 0
        logger.info("merged", metadata: ["folded": "\(result.folded)", "remaining": "\(result.remaining)"])
        return result
    }

    /// The policy's decision, the newest point of the chain always kept (backups continue from it,
    /// even if a clock that went back made an older layer look newer).
    static func decide(_ policy: RetentionPolicy, _ layers: [BackupManifest.Layer]) throws -> RetentionPolicy.Decision {
        var decision = try policy.decide(layers)
        if let newest = layers.last?.index, decision.reasons[newest] == nil {
            decision.dropped.removeAll { $0 == newest }
            decision.kept.append(newest)
            decision.reasons[newest] = ["newest"]
        }
        return decision
    }

    /// Folds the layers at positions `from..<k` into point `k`, which must then stand on the
    /// layer before `from` (or alone). The new base of k is the layer at `from` or, when a full
    /// layer lies between, that full layer: when it is already k, the older files just leave the
    /// manifest; otherwise the layers after it up to k are committed into its file in place and
    /// the file takes k's name, or (sizes differ, or the file has other hard links) point k is
    /// written as a new standalone file. Returns the guest bytes written and the chunks hashed.
    private static func fold(_ repo: BackupRepository, _ manifest: BackupManifest, from: Int, into k: Int,
                             logger: Logger, progress: ((UInt64, UInt64) -> Void)?) throws -> Folded {
        var manifest = manifest
        let base = max(from, manifest.segmentStart(of: k))
        // Nothing is recorded before every file the merge changes, replaces or removes is
        // ours alone (no VM or qemu-nbd reads it) and every file it reads holds what the
        // manifest says: a refused merge leaves the repository as it was.
        let held = try lockForChange(repo, manifest.layers[from...k])
        defer { for device in held { device.close() } }
        if base == k {
            let dropped = manifest.layers[from..<k].map(\.file)
            manifest.layers.removeSubrange(from..<k)
            try repo.saveDropping(manifest, files: dropped)
            return Folded(bytes: 0, chunksHashed: 0)
        }
        let sameSize = manifest.layers[base...k].allSatisfy { $0.virtualSize == manifest.layers[base].virtualSize }
        // In place only when no other name shares the base layer's file (a `cp -al` copy).
        let shared = (RepositoryFiles.linkCount(held[base - from]) ?? 1) > 1
        if sameSize && !shared {
            // The newer layers are read whole; of the base file, only the chunks the commit may write.
            try checkDigests(repo, manifest, (base + 1)...k, held: Array(held[(base + 1 - from)...]))
            let checked = try checkChunksToWrite(repo, manifest, base: base, k, device: held[base - from])
            return try commitInPlace(repo, manifest, from: from, k, checked: checked, logger: logger, progress: progress,
                                     recovering: false)
        }
        try checkDigests(repo, manifest, base...k, held: Array(held[(base - from)...]))
        // A new standalone file reads point k through its whole chain: the older layers it
        // reads (kept, so not locked for change) must hold what the manifest says too.
        let segment = manifest.segmentStart(of: k)
        if segment < base {
            let files = RepositoryFiles(directory: repo.path)
            var readers: [FileDevice] = []
            defer { for device in readers { device.close() } }
            for layer in manifest.layers[segment..<base] {
                readers.append(try files.openFile(repo.file(layer.file), writable: false))
            }
            try checkDigests(repo, manifest, segment...(base - 1), held: readers)
        }
        return try rewrite(repo, manifest, from: from, k, logger: logger, progress: progress)
    }

    struct Folded {
        var bytes: UInt64
        var chunksHashed: Int
        /// Chunks of the base file read to check them before the merge (nil: the whole file).
        var chunksChecked: Int? = nil
    }

    /// Checks, before an in-place merge writes the base layer's file, the 4 MiB chunks of it that
    /// the commit of the newer layers may write, against their recorded digests, and returns
    /// them (nil when the record has no chunks and the whole file was checked). A chunk is left
    /// out only when every cluster in it is a data cluster of a guest cluster that no newer layer
    /// allocates (the commit writes a guest cluster's own data cluster, metadata, and clusters it
    /// allocates: those are free or past the end): it keeps its digest, and verify still covers it.
    static func checkChunksToWrite(_ repo: BackupRepository, _ manifest: BackupManifest, base: Int, _ k: Int,
                                   device: FileDevice) throws -> Set<Int>? {
        let layer = manifest.layers[base]
        guard layer.chunks != nil else {
            try checkDigests(repo, manifest, base...base, held: [device])
            return nil
        }
        let size = try device.size()
        if let problem = LayerDigest.sizeProblem(size, layer: layer) { throw damaged(repo, layer, problem) }
        let files = RepositoryFiles(directory: repo.path, takesLocks: false)
        let image = try ImageOpener.openQCow(repo.file(layer.file), files: files)
        defer { image.close() }
        let clusterSize = UInt64(image.clusterSize)
        // The guest clusters the newer layers allocate (data or zeros), in base clusters.
        var written = CopyPlan(size: image.virtualSize, grain: clusterSize)
        var ranges: [Range<UInt64>] = []
        for newer in manifest.layers[(base + 1)...k] {
            let top = try ImageOpener.openQCow(repo.file(newer.file), files: files)
            defer { top.close() }
            ranges += try CopyPlan.allocated(in: LayerReader(top), grain: clusterSize, zeros: true).ranges
        }
        for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) { written.add(range) }
        let chunkSize = UInt64(BackupManifest.chunkSize)
        let count = LayerDigest.chunkCount(of: size)
        // Per chunk, the clusters that are data of a guest cluster left alone; a host cluster met
        // twice (from different guest clusters) is never counted.
        var untouched = [Int](repeating: 0, count: count)
        var seen = [UInt64](repeating: 0, count: Int((size + clusterSize - 1) / clusterSize + 63) / 64)
        var mustCheck = Set<Int>()
        var next = 0
        try LayerReader(image).forEachExtent(in: 0..<image.virtualSize) { status in
            guard let host = status.hostOffset else { return }
            // Guest cluster by guest cluster: each maps to one host cluster.
            var guest = status.start
            let end = status.start + status.length
            while guest < end {
                let piece = guest..<min(end, (guest / clusterSize + 1) * clusterSize)
                while next < written.ranges.count, written.ranges[next].upperBound <= piece.lowerBound { next += 1 }
                let touched = next < written.ranges.count && written.ranges[next].lowerBound < piece.upperBound
                let cluster = (host + (guest - status.start)) / clusterSize
                let chunk = Int(cluster * clusterSize / chunkSize)
                if chunk < count {
                    let (word, bit) = (Int(cluster / 64), UInt64(1) << (cluster % 64))
                    if touched || word >= seen.count || seen[word] & bit != 0 {
                        mustCheck.insert(chunk)
                    } else {
                        seen[word] |= bit
                        untouched[chunk] += 1
                    }
                }
                guest = piece.upperBound
            }
        }
        var check = Set<Int>()
        for chunk in 0..<count {
            let bytes = min(chunkSize, size - UInt64(chunk) * chunkSize)
            let clusters = Int((bytes + clusterSize - 1) / clusterSize)
            if mustCheck.contains(chunk) || untouched[chunk] < clusters { check.insert(chunk) }
        }
        // Clusters the commit appends may start in the last chunk.
        if count > 0 { check.insert(count - 1) }
        let bad = try LayerDigest.mismatchedChunks(check.sorted(), of: device, layer: layer)
        if !bad.isEmpty { throw damaged(repo, layer, LayerDigest.chunkProblem(bad)) }
        return check
    }

    /// Takes a writer's image locks on each layer file (on descriptors of their own, held
    /// until the merge ends): QEMU refuses to open them meanwhile, and a file that a VM or
    /// qemu-nbd already holds makes the merge refuse before it records anything.
    static func lockForChange(_ repo: BackupRepository, _ layers: ArraySlice<BackupManifest.Layer>) throws -> [FileDevice] {
        let files = RepositoryFiles(directory: repo.path)
        var held: [FileDevice] = []
        do {
            for layer in layers {
                let device = try files.openFile(repo.file(layer.file), writable: false)
                held.append(device)
                do {
                    try ImageLock.acquire(device, writable: true)
                } catch let error as QCowError where error.code == .locked {
                    throw ChainError(.locked, "layer \(layer.file) is in use by another process (a VM or qemu-nbd?); merge changes nothing while a point is open",
                                     path: repo.file(layer.file))
                }
            }
        } catch {
            for device in held { device.close() }
            throw error
        }
        return held
    }

    /// Every layer the merge reads must still hold the bytes the manifest recorded: a damaged
    /// layer is refused, never folded into a file that would then get a fresh checksum.
    static func checkDigests(_ repo: BackupRepository, _ manifest: BackupManifest, _ range: ClosedRange<Int>,
                             held: [FileDevice]) throws {
        for (i, device) in zip(range, held) {
            let layer = manifest.layers[i]
            if let problem = try LayerDigest.problem(device, layer: layer) { throw damaged(repo, layer, problem) }
        }
    }

    /// The refusal of a merge that found `layer` not matching its recorded checksum (`problem` says how).
    static func damaged(_ repo: BackupRepository, _ layer: BackupManifest.Layer, _ problem: String) -> ChainError {
        ChainError(.corrupt, "layer \(layer.index) (\(layer.file)) does not match its checksum in the manifest (\(problem)): damaged or changed since it was written; merge refuses to fold it — run 'qbackup verify'",
                   path: repo.file(layer.file))
    }

    /// Steps 1-5 of an in-place merge of point `k`; returns the guest bytes written and the chunks
    /// hashed (a fresh merge notes which chunks of the base file it writes and hashes only those:
    /// the others hold the bytes `checkDigests` just checked). Every file is
    /// opened (the full layer for writing) before step 1 records anything. `recovering`: an
    /// earlier attempt, already recorded, may have died midway, leaving leaked clusters to free.
    private static func commitInPlace(_ repo: BackupRepository, _ manifest: BackupManifest, from: Int, _ k: Int,
                                      checked: Set<Int>? = nil, logger: Logger, progress: ((UInt64, UInt64) -> Void)?,
                                      recovering: Bool) throws -> Folded {
        var manifest = manifest
        let base = max(from, manifest.segmentStart(of: k))
        let into = manifest.layers[base].file
        let basePath = repo.file(into)
        let newer = manifest.layers[(base + 1)...k]
        let total = newer.reduce(UInt64(0)) { $0 + $1.virtualSize }
        var done: UInt64 = 0
        var written: UInt64 = 0
        // What the commit writes into the base file. A recovery knows nothing of what the
        // interrupted attempt wrote, and a version 1 record has no chunks: those hash it whole.
        let recorded = recovering ? nil : manifest.layers[base].chunks
        let log = WriteLog(granularity: UInt64(BackupManifest.chunkSize))
        var logged = false
        // A recovery holds no locks yet; a fresh merge holds them on other descriptors.
        let files = RepositoryFiles(directory: repo.path, takesLocks: recovering)
        let opened = try ImageOpener.open(basePath, format: .qcow2, writable: true, files: files)
        do {
            defer { opened.close() }
            // A full base layer stands alone; an incremental one (a fold in the middle) keeps its backing file.
            guard let baseFile = opened as? QCowFile, (baseFile.backing == nil) == (manifest.layers[base].kind == .full) else {
                throw ChainError(.corrupt, "the base layer's backing file does not match its kind in the manifest", path: basePath)
            }
            if recorded != nil, let device = baseFile.device as? FileDevice {
                device.writeLog = log
                logged = true
            }
            var tops: [QCowFile] = []
            defer { for top in tops { top.close() } }
            for layer in newer {
                tops.append(try ImageOpener.openQCow(repo.file(layer.file), files: files))
            }
            if recovering {
                let report = try QCowChecker.check(baseFile, repair: .leaks)
                guard report.corruptions == 0 else {
                    throw ChainError(.corrupt, "the full layer being merged into is corrupt; run 'qbackup check --repair all' on it",
                                     path: basePath)
                }
            } else {
                // 1. Record the intent.
                manifest.pendingMerge = BackupManifest.PendingMerge(file: manifest.layers[k].file, sha256: "", fileSize: 0,
                                                                    folded: k, from: from > 0 ? from : nil, into: into)
                try repo.save(manifest)
            }
            // 2. Commit each newer layer's clusters.
            for (layer, top) in zip(newer, tops) {
                let before = done
                let result = try ImageCommitter.commit(top: top, into: baseFile) { offset, _ in
                    progress?(before + offset, total)
                }
                written += result.dataBytes
                done += layer.virtualSize
            }
        }
        // 3-5.
        let digest: LayerDigest
        let identity: BackupManifest.Identity
        let hashed: Int
        if logged, let recorded {
            let oldSize = manifest.layers[base].fileSize
            if let checked {
                // What `checkChunksToWrite` left out must be what the commit left alone.
                let unchecked = log.changedChunks(oldSize: oldSize, newSize: oldSize)
                    .filter { $0 < LayerDigest.chunkCount(of: oldSize) && !checked.contains($0) }
                guard unchecked.isEmpty else {
                    throw ChainError(.corrupt, "internal error: the merge wrote chunk(s) \(unchecked.sorted()) of the base layer that it had not checked first",
                                     path: basePath)
                }
            }
            (digest, identity, hashed) = try LayerDigest.update(path: basePath, recorded: recorded,
                                                                oldSize: oldSize, writes: log)
        } else {
            (digest, identity) = try LayerDigest.compute(path: basePath)
            hashed = digest.chunks.count
        }
        manifest.pendingMerge?.sha256 = digest.sha256
        manifest.pendingMerge?.fileSize = digest.size
        manifest.pendingMerge?.chunks = digest.chunks
        manifest.pendingMerge?.identity = identity
        try repo.save(manifest)
        try DurableFiles.rename(basePath, to: repo.file(manifest.layers[k].file))
        try finish(repo, logger: logger)
        return Folded(bytes: written, chunksHashed: hashed, chunksChecked: checked?.count)
    }

    /// Writes point k as a new standalone file and swaps it in (layers of different sizes, or
    /// a full layer whose file has other hard links). No existing file is ever written.
    private static func rewrite(_ repo: BackupRepository, _ manifest: BackupManifest, from: Int, _ k: Int, logger: Logger,
                                progress: ((UInt64, UInt64) -> Void)?) throws -> Folded {
        var manifest = manifest
        let target = manifest.layers[k]
        let tempName = target.file + ".merge" + BackupRepository.tempSuffix
        let temp = repo.file(tempName)
        // The temporary file is journaled before it exists: only a journaled file is ever removed.
        manifest.journal.append(BackupManifest.JournalEntry(file: tempName))
        try repo.save(manifest)
        let image = try RestoreEngine.openPoint(repo.path, manifest, index: k,
                                                files: RepositoryFiles(directory: repo.path, takesLocks: false))
        let layer: LayerWriter.Written
        do {
            defer { image.close() }
            let plan = try CopyPlan.data(of: image, grain: UInt64(manifest.clusterSize))
            layer = try LayerWriter.write(plan: plan, from: image, to: temp, clusterSize: manifest.clusterSize,
                                          backing: nil, compression: .none, progress: progress)
        } catch {
            try? DurableFiles.remove(temp)
            throw error
        }
        let (digest, identity) = layer.digest
        // Record the intent, then switch the file, then finish.
        manifest.pendingMerge = BackupManifest.PendingMerge(file: target.file, sha256: digest.sha256, fileSize: digest.size,
                                                            folded: k, from: from > 0 ? from : nil, chunks: digest.chunks,
                                                            identity: identity)
        try repo.save(manifest)
        try DurableFiles.rename(temp, to: repo.file(target.file))
        try finish(repo, logger: logger)
        // Hashed while it was written.
        return Folded(bytes: layer.bytes, chunksHashed: digest.chunks.count)
    }

    /// Completes (or undoes) a merge that a crash interrupted.
    static func recover(_ repo: BackupRepository, logger: Logger) throws {
        guard var manifest = repo.manifest, let pending = manifest.pendingMerge else { return }
        if let into = pending.into {
            if pending.sha256.isEmpty && (RepositoryFiles.linkCount(repo.file(into)) ?? 1) > 1 {
                // The full layer's file gained another name (`cp -al`) since: it is not written
                // again; point `folded` (which reads the same throughout) is written anew instead.
                logger.info("rewriting an interrupted merge as a new file", metadata: ["into": "\(into)"])
                manifest.pendingMerge = nil
                let held = try lockForChange(repo, manifest.layers[pending.start...pending.folded])
                defer { for device in held { device.close() } }
                _ = try rewrite(repo, manifest, from: pending.start, pending.folded, logger: logger, progress: nil)
            } else if pending.sha256.isEmpty {
                logger.info("committing an interrupted merge again", metadata: ["into": "\(into)"])
                manifest.pendingMerge = pending
                _ = try commitInPlace(repo, manifest, from: pending.start, pending.folded, logger: logger, progress: nil,
                                      recovering: true)
            } else {
                logger.info("finishing an interrupted merge", metadata: ["file": "\(pending.file)"])
                if DurableFiles.exists(repo.file(into)) {
                    try DurableFiles.rename(repo.file(into), to: repo.file(pending.file))
                }
                try finish(repo, logger: logger)
            }
            return
        }
        // A version 1 record holds the whole file's checksum, a version 2 one the digest of its chunks.
        let digest = try? LayerDigest.compute(path: repo.file(pending.file), wholeFile: manifest.version == 1).0
        if (manifest.version == 1 ? digest?.fileSHA256 : digest?.sha256) == pending.sha256 {
            logger.info("finishing an interrupted merge", metadata: ["file": "\(pending.file)"])
            try finish(repo, logger: logger)
        } else {
            logger.info("undoing an interrupted merge", metadata: ["file": "\(pending.file)"])
            manifest.pendingMerge = nil
            try repo.save(manifest)
            try DurableFiles.remove(repo.file(pending.file + ".merge" + BackupRepository.tempSuffix))
        }
    }

    /// The file of layer `folded` now holds the merged layer: drop the layers from `start` before it.
    private static func finish(_ repo: BackupRepository, logger: Logger) throws {
        guard var manifest = repo.manifest, let pending = manifest.pendingMerge else { return }
        let start = pending.start
        // A new file stands alone; an in-place merge's file is what its base layer was (full, or
        // incremental on the layer before `start` for a fold in the middle).
        let full = pending.into.map { into in manifest.layers.first { $0.file == into }?.kind == .full } ?? true
        // An in-place merge's base layer file was renamed to `pending.file`: not to be removed.
        let dropped = manifest.layers[start..<pending.folded].map(\.file).filter { $0 != pending.into }
        manifest.layers.removeSubrange(start..<pending.folded)
        if full { manifest.layers[start].kind = .full }
        if let chunks = pending.chunks {
            manifest.layers[start].record(LayerDigest(chunks: chunks, sha256: pending.sha256, size: pending.fileSize),
                                          identity: pending.identity)
        } else {
            // A version 1 record: the whole file's checksum, checked when the save upgrades it.
            manifest.layers[start].sha256 = pending.sha256
            manifest.layers[start].fileSize = pending.fileSize
        }
        manifest.pendingMerge = nil
        // `list` shows what the merged layer now holds, not the one night it was named after.
        if let held = heldBytes(repo, manifest.layers[start].file, clusterSize: manifest.clusterSize) {
            manifest.layers[start].bytesCopied = held
        }
        // The full layer file an in-place merge committed into now has the folded layer's name;
        // its old sidecar goes with the dropped layers.
        try repo.saveDropping(manifest, files: dropped, sidecarsOf: pending.into.map { [$0] } ?? [])
    }

    /// The guest data a layer file holds (its allocated clusters, as `qemu-img check` counts
    /// them); nil when it cannot be read (the recorded figure then stays).
    static func heldBytes(_ repo: BackupRepository, _ name: String, clusterSize: Int) -> UInt64? {
        let files = RepositoryFiles(directory: repo.path, takesLocks: false)
        guard let file = try? ImageOpener.openQCow(repo.file(name), files: files) else { return nil }
        defer { file.close() }
        return (try? QCowChecker.check(file)).map { $0.allocatedClusters * UInt64(clusterSize) }
    }
}
