import BackupChain
import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// merge never changes what it does not own: a hard-linked copy of the repository keeps
/// restoring what it held, a refused merge (a point held open, a damaged layer) leaves
/// every file byte-identical, and a crash at any step of the new-file path keeps every
/// remaining point exact.
@Suite struct MergeEngineTests {
    /// A repository of three points (a full layer and two incrementals) of a 32 MiB disk.
    static func threePoints(seed: UInt64) throws -> BackupScenario {
        try BackupScenario.points(3, size: "32M", seed: seed, fullWrites: 8, writes: 4, maxOffset: 30 << 20)
    }

    /// Issue 11 item 2: `cp -al repo snap; merge repo --keep 1` must leave every point of
    /// `snap` restoring what it did (merge wrote into the shared full layer's file).
    @Test func mergeLeavesHardLinkedCopyIntact() throws {
        let s = try Self.threePoints(seed: 61)
        let snap = s.dir.file("snap")
        try Tools.run("cp", ["-al", s.repo, snap])
        let before = try BackupScenario.digests(snap)
        try s.qbackup(["merge", s.repo, "--keep", "1"])
        #expect(try BackupScenario.digests(snap) == before, "merge changed a file that the hard-linked copy shares")
        for (k, reference) in s.references.enumerated() {
            let out = s.dir.file("snap-\(k).raw")
            try s.qbackup(["restore", snap, "--to", out, "--at", String(k), "--format", "raw"])
            #expect(try s.same(out, reference), "point \(k) of the hard-linked copy changed")
        }
        try s.expectRestore(2, equals: s.references[2])
        try s.qbackup(["verify", s.repo])
        try s.qbackup(["verify", snap])
    }

    /// Without other links, the in-place path is still taken (its file keeps its inode).
    @Test func unsharedFullLayerIsCommittedInPlace() throws {
        let s = try Self.threePoints(seed: 62)
        let full = s.layerPath(try s.layers()[0])
        let inode = try FileManager.default.attributesOfItem(atPath: full)[.systemFileNumber] as? UInt64
        try s.qbackup(["merge", s.repo, "--keep", "1"])
        let merged = s.layerPath(try s.layers()[0])
        #expect(try FileManager.default.attributesOfItem(atPath: merged)[.systemFileNumber] as? UInt64 == inode)
        try s.expectRestore(2, equals: s.references[2])
    }

    /// Every write/fsync of a merge that must write a new file (the full layer is shared with
    /// a `cp -al` copy), one crash each: the copy's files never change, and after the next
    /// merge every kept point restores byte-exact and the repository verifies.
    @Test func crashAtEveryStepOfTheNewFileMerge() throws {
        let template = try Self.threePoints(seed: 63)
        let work = TempDir("qbackup-merge-crash")
        var pending = 0
        let outcome = try CrashPoints.enumerate(limit: 2000, denseSteps: 40, stride: 4) { n, crashAfter in
            let repo = work.file("repo-\(n)")
            let snap = work.file("snap-\(n)")
            try Tools.run("cp", ["-a", "--sparse=always", template.repo, repo])
            try Tools.run("cp", ["-al", repo, snap])
            let before = try BackupScenario.digests(snap)
            let result = try QBackupBinary.run(["merge", repo, "--keep", "2"], environment: crashAfter)
            if result.status != 0 { #expect(result.stderr.isEmpty, "step \(n): \(result.stderr)") }
            let manifest = try String(contentsOfFile: repo + "/manifest.json", encoding: .utf8)
            if manifest.contains("\"merge\" :") { pending += 1 }
            try template.qbackup(["merge", repo, "--keep", "2"])
            #expect(try BackupScenario.digests(snap) == before, "step \(n): a file of the hard-linked copy changed")
            try template.expectKeeps([1, 2], in: repo, step: "step \(n)")
            try FileManager.default.removeItem(atPath: repo)
            try FileManager.default.removeItem(atPath: snap)
            return result
        }
        #expect(outcome.completed, "the merge never completed within the steps tried")
        #expect(outcome.crashes > 10, "only \(outcome.crashes) crash points were exercised")
        #expect(pending > 0, "no crash fell between recording the merge and finishing it")
    }

    /// Issue 11 item 8 (kill test): kill -9 of the real `qbackup merge` at seeded random moments,
    /// in place (`shared` false) and writing a new file (the full layer shared with a `cp -al`
    /// copy): after the next merge (which recovers) every kept point restores byte-exact, the
    /// repository verifies, and the copy's files never change.
    @Test(arguments: [false, true])
    func killAtRandomMomentsOfMerge(shared: Bool) throws {
        let template = try BackupScenario(size: "128M", seed: shared ? 67 : 66)
        try template.dirty(writes: 120, maxOffset: 120 << 20)
        try template.backup()
        for _ in 0..<2 {
            try template.dirty(writes: 60, zeroes: 3, discards: 3, maxOffset: 120 << 20)
            try template.backup()
        }
        var rng = SeededRandom(seed: shared ? 1067 : 1066)
        let work = TempDir("qbackup-merge-kill")
        // How long one merge takes on this machine now: the kills fall within it.
        let timed = work.file("timed")
        try Tools.run("cp", ["-a", "--sparse=always", template.repo, timed])
        if shared { try Tools.run("cp", ["-al", timed, timed + "-snap"]) }
        let started = Date()
        try template.qbackup(["merge", timed, "--keep", "1"])
        // One timing is a guess on a busy machine: a merge that finished before its kill halves
        // the window for the next rounds, and rounds go on (at most 10) until 3 were killed.
        var window = UInt64(max(Date().timeIntervalSince(started) * 0.9, 0.02) * 1_000_000)
        var killed = 0
        for round in 0..<10 where round < 6 || killed < 3 {
            let repo = work.file("repo-\(round)")
            let snap = work.file("snap-\(round)")
            try Tools.run("cp", ["-a", "--sparse=always", template.repo, repo])
            if shared { try Tools.run("cp", ["-al", repo, snap]) }
            let before = shared ? try BackupScenario.digests(snap) : [:]
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try QBackupBinary.path())
            process.arguments = ["merge", repo, "--keep", "1"]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            usleep(UInt32(rng.next() % window))
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            if process.terminationReason == .uncaughtSignal { killed += 1 } else { window = max(window / 2, 20_000) }
            try template.qbackup(["merge", repo, "--keep", "1"])
            let out = work.file("restore-\(round).raw")
            try template.qbackup(["restore", repo, "--to", out, "--at", "2", "--format", "raw"])
            #expect(try template.same(out, template.references[2]), "round \(round): the kept point differs")
            try template.qbackup(["verify", repo])
            if shared {
                #expect(try BackupScenario.digests(snap) == before, "round \(round): a file of the hard-linked copy changed")
                try FileManager.default.removeItem(atPath: snap)
            }
            try FileManager.default.removeItem(atPath: out)
            try FileManager.default.removeItem(atPath: repo)
        }
        print("merge kill test (shared: \(shared)): \(killed) merges killed before they finished")
        #expect(killed >= 3, "only \(killed) of at most 10 merges were killed before they finished")
    }

    /// Issue 11 item 13: a point mounted with `qemu-nbd -r` makes merge refuse, and the
    /// refusal leaves nothing behind: the manifest byte-identical, no new files, and
    /// restore and verify still work once the export is gone.
    @Test func mergeOfAPointHeldByQemuNbdChangesNothing() throws {
        let s = try Self.threePoints(seed: 64)
        let before = try BackupScenario.digests(s.repo)
        let nbd = try QemuNBD(image: s.layerPath(try s.layers()[1]), bitmap: nil, directory: s.dir)
        let result = try QBackupBinary.run(["merge", s.repo, "--keep", "1"])
        nbd.stop()
        #expect(result.status == 75, "a point held open is busy: \(result.stderr)")
        #expect(result.stderr.hasPrefix("qbackup: error:") && result.stderr.split(separator: "\n").count == 1,
                "\(result.stderr)")
        #expect(result.stderr.contains("in use"), "\(result.stderr)")
        #expect(try BackupScenario.digests(s.repo) == before, "the refused merge changed the repository")
        try s.qbackup(["verify", s.repo])
        for (k, reference) in s.references.enumerated() { try s.expectRestore(k, equals: reference) }
    }

    /// Issue 11 item 4: a byte flipped in a data cluster of layer 1 makes merge refuse (it
    /// would fold the damage and record a fresh checksum); verify still reports the damage.
    @Test func mergeRefusesADamagedLayer() throws {
        let s = try Self.threePoints(seed: 65)
        let layer1 = s.layerPath(try s.layers()[1])
        let map = try Tools.qemuImg("map", "--output=json", "-f", "qcow2", layer1)
        let extents = try JSONHelpers.parse(map.stdout) as? [[String: Any]] ?? []
        let data = try #require(extents.first { ($0["depth"] as? Int) == 0 && ($0["data"] as? Bool) == true })
        let offset = UInt64(try #require(data["offset"] as? Int)) + 100
        let old = try peek(layer1, at: offset, count: 1)[0]
        try poke(layer1, at: offset, [old ^ 0x5a])
        let before = try BackupScenario.digests(s.repo)
        let result = try QBackupBinary.run(["merge", s.repo, "--keep", "1"])
        #expect(result.status == 1, "merge folded a damaged layer: \(result.stdout)\(result.stderr)")
        #expect(result.stderr.contains("checksum"), "\(result.stderr)")
        #expect(try BackupScenario.digests(s.repo) == before, "the refused merge changed the repository")
        let verify = try QBackupBinary.run(["verify", s.repo])
        #expect(verify.status == 1 && verify.stdout.contains("checksum mismatch"), "\(verify.stdout)")
    }

    /// Issue 17 item 6: after a merge `list` shows the folded base as what its file now holds
    /// (kind full, data = its allocated clusters as qemu-img check counts them, size = the file's),
    /// not the one night's bytes copied it was named after; both merge paths.
    @Test(arguments: [false, true]) func listShowsWhatTheMergedLayerHolds(_ hardLinked: Bool) throws {
        let s = try BackupScenario(size: "16M", seed: 63)
        for night in 0..<4 {
            try Tools.qemuIO(s.disk, format: "qcow2", ["write -P \(night + 1) \(night + 1)M 1M"])
            try s.backup()
        }
        if hardLinked { try Tools.run("cp", ["-al", s.repo, s.dir.file("snap")]) }   // forces the new-file path
        try s.qbackup(["merge", s.repo, "--keep", "2"])
        let base = try #require(try s.layers().first)
        #expect(base["index"] as? Int == 2 && base["kind"] as? String == "full", "\(base)")
        let check = try JSONHelpers.parse(try Tools.qemuImg("check", "--output=json", s.layerPath(base)).stdout) as? [String: Any]
        let allocated = try #require(check?["allocated-clusters"] as? Int)
        #expect(allocated == 48)   // 3 MiB written over nights 0-2, 64 KiB clusters
        #expect(base["bytes-copied"] as? Int == allocated * 65536, "\(base)")
        let size = try FileManager.default.attributesOfItem(atPath: s.layerPath(base))[.size] as? Int
        #expect(base["file-size"] as? Int == size)
        let row = try s.qbackup(["list", s.repo]).stdout.split(separator: "\n").first { $0.hasPrefix("2 ") }.map(String.init)
        #expect(row?.contains("full         ") == true && row?.contains(" 3 MiB ") == true, "\(row ?? "")")
        try s.expectRestore(2, equals: s.references[2])
        try s.qbackup(["verify", s.repo])
    }

    /// Issue 13 item 4: an in-place merge re-hashes only the 4 MiB chunks of the full layer's
    /// file that it wrote (the others keep the digests it checked first), and verify still
    /// covers every byte: a flipped byte in a chunk the merge did not hash is found.
    @Test func inPlaceMergeHashesOnlyTheChunksItWrote() throws {
        let s = try BackupScenario(size: "24M", seed: 69)
        try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 24M", s.disk])
        try s.backup()
        // One 64 KiB cluster the full layer already holds: the commit overwrites it in place.
        try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x22 12M 64K", s.disk])
        try s.backup()
        let full = s.layerPath(try s.layers()[0])
        let chunks = Int((try FileManager.default.attributesOfItem(atPath: full)[.size] as? UInt64 ?? 0) + (4 << 20) - 1) >> 22
        #expect(chunks >= 6)
        let result = try MergeEngine.merge(repository: s.repo, keep: 1)
        #expect(result.folded == 1)
        #expect(result.chunksHashed == 1, "hashed \(result.chunksHashed) of \(chunks) chunks")
        try s.expectRestore(1, equals: s.references[1])
        try s.qbackup(["verify", s.repo])
        // A byte of guest data in the first chunk (which the merge did not write) flipped.
        let merged = s.layerPath(try s.layers()[0])
        let map = try Tools.qemuImg("map", "--output=json", "-f", "qcow2", merged)
        let extents = try JSONHelpers.parse(map.stdout) as? [[String: Any]] ?? []
        let first = try #require(extents.compactMap { $0["offset"] as? Int }.min())
        #expect(first < 4 << 20)
        let old = try peek(merged, at: UInt64(first) + 7, count: 1)[0]
        try poke(merged, at: UInt64(first) + 7, [old ^ 0x5a])
        let verify = try QBackupBinary.run(["verify", s.repo])
        #expect(verify.status == 1 && verify.stdout.contains("checksum mismatch"), "\(verify.stdout)\(verify.stderr)")
    }

    /// The host offset in `image` of guest byte `guest` (from qemu-img map).
    private func hostOffset(of guest: UInt64, in image: String) throws -> UInt64 {
        let map = try Tools.qemuImg("map", "--output=json", "-f", "qcow2", image)
        let extents = try JSONHelpers.parse(map.stdout) as? [[String: Any]] ?? []
        let ext = try #require(extents.first {
            guard let start = $0["start"] as? Int, let length = $0["length"] as? Int else { return false }
            return UInt64(start) <= guest && guest < UInt64(start + length) && $0["offset"] is Int
        })
        return UInt64(try #require(ext["offset"] as? Int)) + guest - UInt64(try #require(ext["start"] as? Int))
    }

    /// A 24 MiB full layer of data and a night that rewrote one cluster at 12 MiB.
    private func fullAndOneCluster(seed: UInt64) throws -> BackupScenario {
        let s = try BackupScenario(size: "24M", seed: seed)
        try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 24M", s.disk])
        try s.backup()
        try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x22 12M 64K", s.disk])
        try s.backup()
        return s
    }

    /// Issue 13 item 4: before an in-place merge writes the full layer's file it checks only the
    /// chunks the commit may write (metadata, the data clusters of the guest clusters the newer
    /// layers allocate, the last chunk), not the whole file.
    @Test func inPlaceMergeChecksOnlyTheChunksItMayWrite() throws {
        let s = try fullAndOneCluster(seed: 70)
        let full = s.layerPath(try s.layers()[0])
        let chunks = Int((try FileManager.default.attributesOfItem(atPath: full)[.size] as? UInt64 ?? 0) + (4 << 20) - 1) >> 22
        #expect(chunks >= 6)
        let result = try MergeEngine.merge(repository: s.repo, keep: 1)
        #expect(result.folded == 1)
        #expect(result.chunksChecked >= 2 && result.chunksChecked <= 3, "checked \(result.chunksChecked) of \(chunks) chunks")
        try s.expectRestore(1, equals: s.references[1])
        try s.qbackup(["verify", s.repo])
    }

    /// A byte flipped in the full layer's data cluster that the merge overwrites: the merge
    /// refuses before it writes (it would hide the damage under a fresh digest), naming the
    /// damaged chunk in the same words as verify.
    @Test func mergeRefusesDamageInAChunkItWrites() throws {
        let s = try fullAndOneCluster(seed: 71)
        let full = s.layerPath(try s.layers()[0])
        let at = try hostOffset(of: (12 << 20) + 4096, in: full)
        try poke(full, at: at, [try peek(full, at: at, count: 1)[0] ^ 0x5a])
        let before = try BackupScenario.digests(s.repo)
        let result = try QBackupBinary.run(["merge", s.repo, "--keep", "1"])
        let words = "checksum mismatch in 1 chunk(s) of 4 MiB at file offset(s) 0x\(String((at >> 22) << 22, radix: 16))"
        #expect(result.status == 1 && result.failedCleanly && result.stderr.contains("does not match its checksum in the manifest (\(words))"),
                "\(result.stdout)\(result.stderr)")
        #expect(try BackupScenario.digests(s.repo) == before, "the refused merge changed the repository")
        let verify = try QBackupBinary.run(["verify", s.repo])
        #expect(verify.status == 1 && verify.stdout.contains(words), "\(verify.stdout)\(verify.stderr)")
    }

    /// A byte flipped in a chunk of the full layer that the merge neither reads nor writes: the
    /// merge goes on, the chunk keeps its recorded digest, and verify finds the damage after it.
    @Test func damageTheMergeLeavesAloneIsStillFoundByVerify() throws {
        let s = try fullAndOneCluster(seed: 72)
        let full = s.layerPath(try s.layers()[0])
        let at = try hostOffset(of: 4 << 20, in: full)
        try poke(full, at: at, [try peek(full, at: at, count: 1)[0] ^ 0x5a])
        try s.qbackup(["merge", s.repo, "--keep", "1"])
        let verify = try QBackupBinary.run(["verify", s.repo])
        #expect(verify.status == 1 && verify.stdout.contains("checksum mismatch"), "\(verify.stdout)\(verify.stderr)")
    }
}
