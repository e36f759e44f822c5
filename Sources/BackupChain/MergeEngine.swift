import Logging
import QCowImage

/// Retention: folds the oldest layers so at most N remain, keeping every
/// remaining point in time restorable to the same bytes.
///
/// The new oldest layer k must stand alone. When it is already full, the older
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
    }

    public static func merge(repository: String, keep: Int, logger: Logger = Logger(label: "qbackup.merge"),
                             progress: ((UInt64, UInt64) -> Void)? = nil) throws -> Result {
        guard keep >= 1 else { throw ChainError(.invalidArgument, "--keep must be at least 1") }
        let repo = try BackupRepository(path: repository, exclusive: true)
        try repo.requireIntact()
        try recover(repo, logger: logger)
        try repo.removeLeftovers()
        guard var manifest = repo.manifest, manifest.layers.count > keep else {
            return Result(folded: 0, remaining: repo.manifest?.layers.count ?? 0, bytesWritten: 0)
        }
        let k = manifest.layers.count - keep
        let target = manifest.layers[k]
        let base = manifest.segmentStart(of: k)
        // Nothing is recorded before every file the merge changes, replaces or removes is
        // ours alone (no VM or qemu-nbd reads it) and every file it reads holds what the
        // manifest says: a refused merge leaves the repository as it was.
        let held = try lockForChange(repo, manifest.layers[0...k])
        defer { for device in held { device.close() } }
        var written: UInt64 = 0
        if target.kind == .full {
            let dropped = manifest.layers[0..<k].map(\.file)
            manifest.layers.removeFirst(k)
            try repo.saveDropping(manifest, files: dropped)
        } else {
            try checkDigests(repo, manifest, base...k, held: Array(held[base...k]))
            let sameSize = manifest.layers[base...k].allSatisfy { $0.virtualSize == manifest.layers[base].virtualSize }
            // In place only when no other name shares the full layer's file (a `cp -al` copy).
            let shared = (RepositoryFiles.linkCount(held[base]) ?? 1) > 1
            if sameSize && !shared {
                written = try commitInPlace(repo, manifest, k, logger: logger, progress: progress, recovering: false)
            } else {
                written = try rewrite(repo, manifest, k, logger: logger, progress: progress)
            }
        }
        logger.info("merged", metadata: ["folded": "\(k)", "remaining": "\(keep)"])
        return Result(folded: k, remaining: keep, bytesWritten: written)
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
            if let problem = try LayerDigest.problem(device, layer: layer) {
                throw ChainError(.corrupt, "layer \(layer.index) (\(layer.file)) does not match its checksum in the manifest (\(problem)): damaged or changed since it was written; merge refuses to fold it — run 'qbackup verify'",
                                 path: repo.file(layer.file))
            }
        }
    }

    /// Steps 1-5 of an in-place merge of point `k`; returns the guest bytes written. Every file is
    /// opened (the full layer for writing) before step 1 records anything. `recovering`: an
    /// earlier attempt, already recorded, may have died midway, leaving leaked clusters to free.
    private static func commitInPlace(_ repo: BackupRepository, _ manifest: BackupManifest, _ k: Int, logger: Logger,
                                      progress: ((UInt64, UInt64) -> Void)?, recovering: Bool) throws -> UInt64 {
        var manifest = manifest
        let base = manifest.segmentStart(of: k)
        let into = manifest.layers[base].file
        let basePath = repo.file(into)
        let newer = manifest.layers[(base + 1)...k]
        let total = newer.reduce(UInt64(0)) { $0 + $1.virtualSize }
        var done: UInt64 = 0
        var written: UInt64 = 0
        // A recovery holds no locks yet; a fresh merge holds them on other descriptors.
        let files = RepositoryFiles(directory: repo.path, takesLocks: recovering)
        let opened = try ImageOpener.open(basePath, format: .qcow2, writable: true, files: files)
        do {
            defer { opened.close() }
            guard let baseFile = opened as? QCowFile, baseFile.backing == nil else {
                throw ChainError(.corrupt, "the full layer has a backing file", path: basePath)
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
                                                                    folded: k, into: into)
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
        let (digest, identity) = try LayerDigest.compute(path: basePath)
        manifest.pendingMerge?.sha256 = digest.sha256
        manifest.pendingMerge?.fileSize = digest.size
        manifest.pendingMerge?.chunks = digest.chunks
        manifest.pendingMerge?.identity = identity
        try repo.save(manifest)
        try DurableFiles.rename(basePath, to: repo.file(manifest.layers[k].file))
        try finish(repo, logger: logger)
        return written
    }

    /// Writes point k as a new standalone file and swaps it in (layers of different sizes, or
    /// a full layer whose file has other hard links). No existing file is ever written.
    private static func rewrite(_ repo: BackupRepository, _ manifest: BackupManifest, _ k: Int, logger: Logger,
                                progress: ((UInt64, UInt64) -> Void)?) throws -> UInt64 {
        var manifest = manifest
        let target = manifest.layers[k]
        let tempName = target.file + ".merge" + BackupRepository.tempSuffix
        let temp = repo.file(tempName)
        // The temporary file is journaled before it exists: only a journaled file is ever removed.
        manifest.journal.append(BackupManifest.JournalEntry(file: tempName))
        try repo.save(manifest)
        let image = try RestoreEngine.openPoint(repo.path, manifest, index: k,
                                                files: RepositoryFiles(directory: repo.path, takesLocks: false))
        let source = GuestImageSource(image)
        let layer: LayerWriter.Written
        do {
            defer { source.close() }
            let plan = try CopyPlan.make(kind: .full, source: source, bitmap: "", clusterSize: UInt64(manifest.clusterSize))
            layer = try LayerWriter.write(plan: plan, from: source, to: temp, clusterSize: manifest.clusterSize,
                                          backing: nil, compression: .none, progress: progress)
        } catch {
            try? DurableFiles.remove(temp)
            throw error
        }
        guard let (digest, identity) = layer.digest else {
            throw ChainError(.io, "the merged layer was written without a checksum", path: temp)
        }
        // Record the intent, then switch the file, then finish.
        manifest.pendingMerge = BackupManifest.PendingMerge(file: target.file, sha256: digest.sha256, fileSize: digest.size,
                                                            folded: k, chunks: digest.chunks, identity: identity)
        try repo.save(manifest)
        try DurableFiles.rename(temp, to: repo.file(target.file))
        try finish(repo, logger: logger)
        return layer.bytes
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
                let held = try lockForChange(repo, manifest.layers[0...pending.folded])
                defer { for device in held { device.close() } }
                _ = try rewrite(repo, manifest, pending.folded, logger: logger, progress: nil)
            } else if pending.sha256.isEmpty {
                logger.info("committing an interrupted merge again", metadata: ["into": "\(into)"])
                manifest.pendingMerge = pending
                _ = try commitInPlace(repo, manifest, pending.folded, logger: logger, progress: nil, recovering: true)
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

    /// The file of layer `folded` now holds the merged standalone layer: drop the older layers.
    private static func finish(_ repo: BackupRepository, logger: Logger) throws {
        guard var manifest = repo.manifest, let pending = manifest.pendingMerge else { return }
        // An in-place merge's full layer file was renamed to `pending.file`: not to be removed.
        let dropped = manifest.layers[0..<pending.folded].map(\.file).filter { $0 != pending.into }
        manifest.layers.removeFirst(pending.folded)
        manifest.layers[0].kind = .full
        if let chunks = pending.chunks {
            manifest.layers[0].record(LayerDigest(chunks: chunks, sha256: pending.sha256, size: pending.fileSize),
                                      identity: pending.identity)
        } else {
            // A version 1 record: the whole file's checksum, checked when the save upgrades it.
            manifest.layers[0].sha256 = pending.sha256
            manifest.layers[0].fileSize = pending.fileSize
        }
        manifest.pendingMerge = nil
        // The full layer file an in-place merge committed into now has the folded layer's name;
        // its old sidecar goes with the dropped layers.
        try repo.saveDropping(manifest, files: dropped, sidecarsOf: pending.into.map { [$0] } ?? [])
    }
}
