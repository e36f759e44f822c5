import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// `qbackup repair` and the lost manifest (issue 11 item 1): backup never deletes layers it cannot
/// account for, it refuses and names repair; repair shows what it found and writes only with
/// --yes; it rebuilds exactly from the sidecars, or from the backing chains of a version 1
/// folder; misfits are left out with a reason, never deleted; a kill or crash at any moment
/// leaves either no manifest (repair runs again) or a complete one, and never touches a layer.
@Suite struct RepairEngineTests {
    /// Three points of a 64 MiB disk (the full layer spans several 4 MiB chunks).
    static func threePoints(seed: UInt64, size: String = "64M") throws -> BackupScenario {
        try BackupScenario.points(3, size: size, seed: seed, fullWrites: 40, writes: 6, maxOffset: 60 << 20)
    }

    static func isLayerName(_ name: String) -> Bool {
        (name.hasPrefix("full-") || name.hasPrefix("incr-")) && name.hasSuffix(".qcow2")
    }

    static func manifestJSON(_ repo: String) throws -> NSDictionary {
        NSDictionary(dictionary: try BackupManifestTests.json(repo + "/manifest.json"))
    }

    enum Loss: String, CaseIterable, Sendable { case removed, listsNoLayers, unreadable }

    /// (a) and (d): the manifest removed, one that lists no layers, or one cut short. backup refuses naming
    /// repair and changes nothing; repair without --yes writes nothing; with --yes the manifest
    /// comes back exactly (every field), every point restores byte-exact, verify passes, and the
    /// next backup is an incremental that continues the chain.
    @Test(arguments: Loss.allCases)
    func aLostManifestIsRefusedThenRebuiltExactly(loss: Loss) throws {
        let s = try Self.threePoints(seed: 81 + UInt64(Loss.allCases.firstIndex(of: loss) ?? 0) * 10)
        let original = try Self.manifestJSON(s.repo)
        switch loss {
        case .removed:
            try FileManager.default.removeItem(atPath: s.repo + "/manifest.json")
        case .listsNoLayers:
            var m = try BackupManifestTests.json(s.repo + "/manifest.json")
            m["layers"] = [Any]()
            try JSONSerialization.data(withJSONObject: m).write(to: URL(fileURLWithPath: s.repo + "/manifest.json"))
        case .unreadable:
            try Tools.run("truncate", ["-s", "100", s.repo + "/manifest.json"])
        }
        try s.dirty(writes: 3, maxOffset: 60 << 20)
        let before = try BackupScenario.digests(s.repo)

        let refused = try QBackupBinary.run(["backup", s.disk, "--repo", s.repo])
        #expect(refused.failedCleanly, "backup into a repository without its manifest: \(refused.status) \(refused.stderr)")
        #expect(refused.stderr.contains("qbackup repair \(s.repo)"), "\(refused.stderr)")
        #expect(try BackupScenario.digests(s.repo) == before, "the refused backup changed the repository")
        let refusedMerge = try QBackupBinary.run(["merge", s.repo, "--keep", "1"])
        #expect(refusedMerge.failedCleanly && refusedMerge.stderr.contains("qbackup repair"), "\(refusedMerge.stderr)")
        #expect(try BackupScenario.digests(s.repo) == before, "the refused merge changed the repository")

        let shown = try s.qbackup(["repair", s.repo])
        #expect(shown.stdout.contains("layer sidecars") && shown.stdout.contains("3 layer(s)"), "\(shown.stdout)")
        #expect(shown.stdout.contains("the manifest cannot be read") == (loss == .unreadable), "\(shown.stdout)")
        #expect(shown.stdout.contains("--yes"), "\(shown.stdout)")
        #expect(try BackupScenario.digests(s.repo) == before, "repair without --yes wrote something")

        let written = try s.qbackup(["repair", s.repo, "--yes", "--output", "json"])
        let report = try #require(try JSONHelpers.parse(written.stdout) as? [String: Any])
        #expect(report["written"] as? Bool == true && report["basis"] as? String == "sidecars", "\(written.stdout)")
        #expect((report["left-out"] as? [Any])?.isEmpty == true, "\(written.stdout)")
        #expect(try Self.manifestJSON(s.repo).isEqual(original),
                "the rebuilt manifest differs from the one that was lost")
        for (name, digest) in before where name != "manifest.json" {
            #expect(try BackupScenario.digests(s.repo)[name] == digest, "repair changed \(name)")
        }
        for (k, reference) in s.references.enumerated() { try s.expectRestore(k, equals: reference) }
        try s.qbackup(["verify", s.repo, "--image", s.disk])
        let again = try s.qbackup(["repair", s.repo])
        #expect(again.stdout.contains("nothing to repair"), "\(again.stdout)")

        let next = try s.backup()
        #expect(next["kind"] as? String == "incremental" && next["reason"] == nil, "\(next)")
        #expect(try s.layers().map { $0["index"] as? Int } == [0, 1, 2, 3])
        try s.expectRestore(3, equals: s.references[3])
        try s.qbackup(["verify", s.repo])
    }

    /// (b): a version 1 folder (no sidecars) without its manifest. backup treats it as a new
    /// repository and leaves the old files byte-identical (foreign, verify warns about them);
    /// repair --source rebuilds from the layers' backing chains and every point restores.
    @Test func aVersion1FolderWithoutManifestIsNewAndRepairRebuildsFromBackingChains() throws {
        let s = try Self.threePoints(seed: 83)
        let oldLayers = try s.layers().map { $0["file"] as? String ?? "" }
        try BackupManifestTests.downgrade(s)
        try FileManager.default.removeItem(atPath: s.repo + "/manifest.json")
        let copy = s.dir.file("copy")
        try Tools.run("cp", ["-a", "--sparse=always", s.repo, copy])
        let before = try BackupScenario.digests(s.repo)

        // backup into the copy: a new repository; the old files are foreign and untouched.
        let out = try s.qbackup(["backup", s.disk, "--repo", copy, "--output", "json"])
        #expect((try JSONHelpers.parse(out.stdout) as? [String: Any])?["kind"] as? String == "full", "\(out.stdout)")
        let after = try BackupScenario.digests(copy)
        for name in oldLayers { #expect(after[name] == before[name], "backup changed the foreign file \(name)") }
        let verify = try s.qbackup(["verify", copy])
        for name in oldLayers { #expect(verify.stderr.contains("warning: \(name) is not a file of this repository"), "\(verify.stderr)") }

        // repair of the original folder: nothing names the disk, so --source is needed.
        let noSource = try QBackupBinary.run(["repair", s.repo, "--yes"])
        #expect(noSource.failedCleanly && noSource.stderr.contains("--source"), "\(noSource.stderr)")
        #expect(try BackupScenario.digests(s.repo) == before, "repair without --source wrote something")
        // Only looking makes no file, not even the lock file.
        try FileManager.default.removeItem(atPath: s.repo + "/.qbackup.lock")
        let shown = try s.qbackup(["repair", s.repo, "--source", s.disk])
        #expect(shown.stdout.contains("backing chains") && shown.stdout.contains("3 layer(s)"), "\(shown.stdout)")
        #expect(try BackupScenario.digests(s.repo) == before.filter { $0.key != ".qbackup.lock" }, "repair without --yes wrote something")
        try s.qbackup(["repair", s.repo, "--source", s.disk, "--yes"])
        let layers = try s.layers()
        #expect(layers.map { $0["file"] as? String ?? "" } == oldLayers)
        #expect(layers.map { $0["index"] as? Int } == [0, 1, 2])
        for name in oldLayers { #expect(try BackupScenario.digests(s.repo)[name] == before[name], "repair changed \(name)") }
        for (k, reference) in s.references.enumerated() { try s.expectRestore(k, equals: reference) }
        try s.qbackup(["verify", s.repo])
        // The rebuilt repository has a bitmap of its own: the next backup is full, then incrementals follow.
        try s.dirty(writes: 3, maxOffset: 60 << 20)
        #expect(try s.backup()["kind"] as? String == "full")
        try s.dirty(writes: 3, maxOffset: 60 << 20)
        #expect(try s.backup()["kind"] as? String == "incremental")
        for (k, reference) in s.references.enumerated() { try s.expectRestore(k, equals: reference) }
    }

    enum Misfit: String, CaseIterable, Sendable {
        case damaged, missing, symlinked, badSidecar, symlinkedSidecar, hugeSidecar
        /// The sidecar, not the layer, is what does not fit: it is not read as a record.
        var ofSidecar: Bool { [.badSidecar, .symlinkedSidecar, .hugeSidecar].contains(self) }
    }

    /// (c): the newest layer does not fit (its bytes are not what its sidecar says, its file is
    /// gone, it is a symlink, its sidecar is not a valid record): repair leaves it out, says
    /// why, deletes nothing; the kept points restore, and the next backup is a full one (the
    /// bitmap was cleared by the layer left out).
    @Test(arguments: Misfit.allCases)
    func misfitsAreLeftOutWithAReasonNeverDeleted(misfit: Misfit) throws {
        let s = try Self.threePoints(seed: 84 + UInt64(Misfit.allCases.firstIndex(of: misfit) ?? 0))
        let newest = try #require(try s.layers().last?["file"] as? String)
        let path = s.repo + "/" + newest
        try FileManager.default.removeItem(atPath: s.repo + "/manifest.json")
        let outside = s.dir.file("outside.qcow2")
        let expectedReason: String
        switch misfit {
        case .damaged:
            let map = try Tools.qemuImg("map", "--output=json", "-f", "qcow2", path)
            let extents = try JSONHelpers.parse(map.stdout) as? [[String: Any]] ?? []
            let data = try #require(extents.first { ($0["depth"] as? Int) == 0 && ($0["data"] as? Bool) == true })
            let offset = UInt64(try #require(data["offset"] as? Int)) + 100
            try poke(path, at: offset, [try peek(path, at: offset, count: 1)[0] ^ 0x5a])
            expectedReason = "checksum mismatch"
        case .missing:
            try FileManager.default.removeItem(atPath: path)
            expectedReason = "No such file"
        case .symlinked:
            try FileManager.default.moveItem(atPath: path, toPath: outside)
            try FileManager.default.createSymbolicLink(atPath: path, withDestinationPath: outside)
            expectedReason = "symbolic link"
        case .badSidecar:
            try Data("{\"format\": \"qbackup-layer\", \"version\": 2}".utf8).write(to: URL(fileURLWithPath: path + ".json"))
            expectedReason = "sidecar"
        case .symlinkedSidecar:
            try FileManager.default.moveItem(atPath: path + ".json", toPath: outside + ".json")
            try FileManager.default.createSymbolicLink(atPath: path + ".json", withDestinationPath: outside + ".json")
            expectedReason = "symbolic link"
        case .hugeSidecar:
            try Tools.run("truncate", ["-s", "100M", path + ".json"])
            expectedReason = "more than the limit"
        }
        let outsideBefore = misfit == .symlinked ? try BackupScenario.digests(s.dir.path)["outside.qcow2"] : nil
        let before = try BackupScenario.digests(s.repo)
        let result = try s.qbackup(["repair", s.repo, "--yes"])
        let line = result.stdout.split(separator: "\n").first { $0.hasPrefix("left out \(newest): ") } ?? ""
        #expect(line.contains(expectedReason), "\(result.stdout)")
        #expect(result.stdout.contains("2 layer(s)") && result.stdout.contains("bitmap remove"), "\(result.stdout)")
        // Every file is still there; the layer files and the misfit's sidecar are byte-identical
        // (the kept layers' sidecars are rewritten: they name the new bitmap).
        let unchanged = { (name: String) in Self.isLayerName(name) || name == newest + ".json" }
        let after = try BackupScenario.digests(s.repo)
        for (name, digest) in before {
            #expect(after[name] != nil, "repair removed \(name)")
            if unchanged(name) { #expect(after[name] == digest, "repair changed \(name)") }
        }
        if misfit == .symlinkedSidecar {
            #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: path + ".json")) == outside + ".json")
        }
        if misfit == .symlinked {
            #expect((try? FileManager.default.destinationOfSymbolicLink(atPath: path)) == outside)
            #expect(try BackupScenario.digests(s.dir.path)["outside.qcow2"] == outsideBefore, "repair changed the file outside")
        }
        #expect(try s.layers().map { $0["index"] as? Int } == [0, 1])
        for k in 0..<2 { try s.expectRestore(k, equals: s.references[k]) }
        let verify = try s.qbackup(["verify", s.repo])
        #expect(verify.stderr.contains("warning: \(newest)") || misfit == .missing, "\(verify.stderr)")
        // The misfit does not block the repository, and the next backup does not build on a
        // bitmap that the left-out layer cleared.
        let next = try s.backup()
        #expect(next["kind"] as? String == "full", "\(next)")
        // The left-out layer keeps its index (its sidecar claims it); an unreadable sidecar claims nothing.
        #expect(next["index"] as? Int == (misfit.ofSidecar ? 2 : 3), "\(next)")
        try s.expectRestore(next["index"] as? Int ?? -1, equals: s.references[3])
        #expect(next["layer"] as? String != newest)
        let final = try BackupScenario.digests(s.repo)
        for (name, digest) in before where unchanged(name) {
            #expect(final[name] == digest, "the next backup changed or removed \(name)")
        }
    }

    /// A repository made ready for a repair: three points, no manifest; `sidecars` false also
    /// removes the sidecars (a version 1 folder), so repair writes one per layer and the manifest.
    static func lostManifest(seed: UInt64, sidecars: Bool, size: String = "64M") throws -> BackupScenario {
        let s = try threePoints(seed: seed, size: size)
        if !sidecars { try BackupManifestTests.downgrade(s) }
        try FileManager.default.removeItem(atPath: s.repo + "/manifest.json")
        return s
    }

    /// The layers' files, kinds and digests as `list` and the manifest give them.
    static func chain(_ s: BackupScenario, _ repo: String) throws -> [String] {
        let m = try BackupManifestTests.json(repo + "/manifest.json")
        return (m["layers"] as? [[String: Any]] ?? []).map {
            "\($0["index"] ?? "")/\($0["file"] ?? "")/\($0["kind"] ?? "")/\($0["sha256"] ?? "")/\($0["file-size"] ?? "")"
        }
    }

    /// After an interrupted `repair --yes` of `repo` (a copy of `s.repo`): either no manifest
    /// (and repair then completes) or a complete one; the layer files never changed; every
    /// point restores byte-exact and the repository verifies.
    static func expectRepairedOrRepairable(_ s: BackupScenario, _ repo: String, layerDigests: [String: String],
                                           expected: [String], step: String) throws {
        let manifest = repo + "/manifest.json"
        if FileManager.default.fileExists(atPath: manifest) {
            #expect(try chain(s, repo) == expected, "\(step): the manifest on disk is not the complete rebuilt one")
        }
        try s.qbackup(["repair", repo, "--yes", "--source", s.disk])
        #expect(try chain(s, repo) == expected, "\(step): repair after the interruption rebuilt another chain")
        let now = try BackupScenario.digests(repo)
        for (name, digest) in layerDigests { #expect(now[name] == digest, "\(step): \(name) changed") }
        for (k, reference) in s.references.enumerated() {
            let out = s.dir.file("restore-\(UUID().uuidString.prefix(6)).raw")
            try s.qbackup(["restore", repo, "--to", out, "--at", String(k), "--format", "raw"])
            #expect(try s.same(out, reference), "\(step): point \(k) differs")
            try FileManager.default.removeItem(atPath: out)
        }
        try s.qbackup(["verify", repo])
    }

    /// Every write and fsync of `repair --yes` (QBACKUP_CRASH_AFTER 1, 2, … until it completes),
    /// from sidecars and from backing chains (either way, on a copy whose inodes changed, a
    /// sidecar per layer, then the manifest): after each crash, no manifest or a complete one,
    /// layers untouched, and the repair run again rebuilds the same chain, every point byte-exact.
    @Test(arguments: [true, false])
    func crashAtEveryStepOfRepair(sidecars: Bool) throws {
        let s = try Self.lostManifest(seed: sidecars ? 91 : 92, sidecars: sidecars)
        let layerDigests = try BackupScenario.digests(s.repo).filter { Self.isLayerName($0.key) }
        #expect(layerDigests.count == 3)
        // The chain an uninterrupted repair rebuilds.
        let reference = s.dir.file("reference")
        try Tools.run("cp", ["-a", "--sparse=always", s.repo, reference])
        try s.qbackup(["repair", reference, "--yes", "--source", s.disk])
        let expected = try Self.chain(s, reference)
        #expect(expected.count == 3)
        let outcome = try CrashPoints.enumerate(limit: 200) { n, crashAfter in
            let repo = s.dir.file("repo-\(n)")
            try Tools.run("cp", ["-a", "--sparse=always", s.repo, repo])
            let result = try QBackupBinary.run(["repair", repo, "--yes", "--source", s.disk], environment: crashAfter)
            if result.status != 0 {
                #expect(result.status == 128 + SIGKILL || result.status == SIGKILL, "step \(n): \(result.status) \(result.stderr)")
            }
            try Self.expectRepairedOrRepairable(s, repo, layerDigests: layerDigests, expected: expected, step: "step \(n)")
            try FileManager.default.removeItem(atPath: repo)
            return result
        }
        print("repair crash points (sidecars: \(sidecars)): \(outcome.crashes)")
        #expect(outcome.completed, "repair never completed within the steps tried")
        #expect(outcome.crashes >= (sidecars ? 2 : 8), "only \(outcome.crashes) crash points were exercised")
    }

    /// kill -9 of the real `qbackup repair --yes` at seeded random moments within the measured
    /// duration of one repair (from backing chains: it hashes every layer, then writes a sidecar
    /// each and the manifest): no manifest or a complete one, layers never touched, and repair
    /// run again completes with every point byte-exact.
    @Test func killAtRandomMomentsOfRepair() throws {
        let s = try Self.lostManifest(seed: 93, sidecars: false)
        let layerDigests = try BackupScenario.digests(s.repo).filter { Self.isLayerName($0.key) }
        let timed = s.dir.file("timed")
        try Tools.run("cp", ["-a", "--sparse=always", s.repo, timed])
        let started = Date()
        try s.qbackup(["repair", timed, "--yes", "--source", s.disk])
        // One timing is a guess on a busy machine: a repair that finished before its kill halves
        // the window for the next rounds, and rounds go on (at most 10) until 3 were killed.
        var window = UInt64(max(Date().timeIntervalSince(started) * 1.1, 0.02) * 1_000_000)
        let expected = try Self.chain(s, timed)
        var rng = SeededRandom(seed: 1093)
        var killed = 0
        for round in 0..<10 where round < 6 || killed < 3 {
            let repo = s.dir.file("repo-\(round)")
            try Tools.run("cp", ["-a", "--sparse=always", s.repo, repo])
            let running = try RunningQBackup(["repair", repo, "--yes", "--source", s.disk], directory: s.dir)
            usleep(UInt32(rng.next() % window))
            running.kill()
            let result = running.wait()
            if running.process.terminationReason == .uncaughtSignal { killed += 1 } else {
                window = max(window / 2, 20_000)
                #expect(result.status == 0, "round \(round): \(result.stderr)")
            }
            try Self.expectRepairedOrRepairable(s, repo, layerDigests: layerDigests, expected: expected,
                                                step: "round \(round)")
            try FileManager.default.removeItem(atPath: repo)
        }
        print("repair kill test: \(killed) repairs killed before they finished")
        #expect(killed >= 3, "only \(killed) of at most 10 repairs were killed before they finished")
    }
}
