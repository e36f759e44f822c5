import Foundation
import Testing
import TestSupport

/// The nightly job end to end, QEMU as the writer: full backup, rounds of
/// writes with incremental backups, then every point restores exactly.
@Suite struct BackupEndToEndTests {
    @Test func nightlyRoundsRestoreEveryPoint() throws {
        let s = try BackupScenario(seed: 7)
        try s.dirty(writes: 250)  // ~25 MiB of scattered data
        let full = try s.backup()
        #expect(full["kind"] as? String == "full")
        var changed: [UInt64] = []
        for round in 1...4 {
            try s.dirty(writes: 10 * round, zeroes: 5, discards: 3)
            let inc = try s.backup()
            #expect(inc["kind"] as? String == "incremental")
            changed.append(UInt64(inc["bytes-copied"] as? Int ?? 0))
        }
        let layers = try s.layers()
        #expect(layers.count == 5)
        for (k, reference) in s.references.enumerated() {
            try s.expectRestore(k, equals: reference)
            // Any layer is an ordinary qcow2 chain that qemu-img reads without qbackup.
            let path = s.layerPath(layers[k])
            #expect(try s.same(path, reference), "qemu-img reads layer \(k) differently")
            try s.expectQemuCheckClean(path)
        }
        // A layer's size follows the data changed in its round.
        let sizes = layers.dropFirst().map { UInt64($0["file-size"] as? Int ?? 0) }
        for (size, copied) in zip(sizes, changed) {
            #expect(size < copied + (2 << 20), "layer of \(size) bytes for \(copied) bytes copied")
        }
        #expect(changed[0] < changed[3])
        // The chain verifies, and the disk itself is still clean for QEMU.
        try s.qbackup(["verify", s.repo, "--image", s.disk])
        try s.expectQemuCheckClean(s.disk)
        // The last restore in qcow2 format is a standalone image.
        try s.expectRestore(4, equals: s.references[4], format: "qcow2")
    }

    @Test(arguments: [
        ("backing file", "backing"), ("compressed clusters", "compressed"), ("extended L2", "extended_l2"),
        ("granularity 512", "gran512"), ("granularity 2M", "gran2M"),
    ])
    func sourceVariants(_ name: String, _ variant: String) throws {
        let s: BackupScenario
        switch variant {
        case "extended_l2":
            s = try BackupScenario(size: "256M", createOptions: "cluster_size=65536,extended_l2=on", seed: 3)
        case "backing":
            s = try BackupScenario(size: "256M", seed: 4)
            let base = s.dir.file("base.qcow2")
            try Tools.qemuImg("create", "-q", "-f", "qcow2", base, "256M")
            try Tools.qemuIO(base, format: "qcow2", ["write -P 0x42 0 8M", "write -P 0x43 100M 3M"])
            try Tools.qemuImg("rebase", "-u", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s.disk)
        case "compressed":
            s = try BackupScenario(size: "256M", seed: 5)
            let raw = s.dir.file("src.qcow2")
            try Tools.qemuImg("create", "-q", "-f", "qcow2", raw, "256M")
            try Tools.qemuIO(raw, format: "qcow2", ["write -P 0x21 0 20M", "write -P 0x22 50M 7M"])
            try FileManager.default.removeItem(atPath: s.disk)
            try Tools.qemuImg("convert", "-c", "-O", "qcow2", raw, s.disk)
        default:
            s = try BackupScenario(size: "256M", seed: 6)
            try s.dirty(writes: 40, maxOffset: 200 << 20)
            try Tools.qemuImg("bitmap", "--add", "-g", variant == "gran512" ? "512" : "2M", s.disk, "nightly")
        }
        try s.dirty(writes: 30, maxOffset: 200 << 20)
        // The bitmap qemu-img just added exists already: a new repository adopts it only when told.
        try s.backup(variant.hasPrefix("gran") ? ["--bitmap", "nightly", "--take-over-bitmap"] : [])
        for round in 0..<2 {
            try s.dirty(writes: 15 + round, zeroes: 3, discards: 2, maxOffset: 200 << 20)
            try s.backup()
        }
        for (k, reference) in s.references.enumerated() { try s.expectRestore(k, equals: reference) }
        try s.qbackup(["verify", s.repo, "--image", s.disk])
        try s.expectQemuCheckClean(s.disk)
    }

    @Test func mergeKeepsEveryRemainingPoint() throws {
        for keep in [1, 2, 4] {
            let s = try BackupScenario(size: "512M", seed: UInt64(10 + keep))
            try s.dirty(writes: 60, maxOffset: 400 << 20)
            try s.backup()
            for _ in 0..<4 {
                try s.dirty(writes: 12, zeroes: 2, discards: 2, maxOffset: 400 << 20)
                try s.backup()
            }
            try s.qbackup(["merge", s.repo, "--keep", String(keep)])
            let layers = try s.layers()
            #expect(layers.count == keep)
            #expect(layers.first?["kind"] as? String == "full")
            // Points keep their indices for life: the kept ones are still the newest indices.
            for (j, (k, reference)) in s.references.enumerated().suffix(keep).enumerated() {
                #expect(layers[j]["index"] as? Int == k)
                try s.expectRestore(k, equals: reference)
                try s.expectQemuCheckClean(s.layerPath(layers[j]))
            }
            try s.qbackup(["verify", s.repo])
            // The chain goes on after a merge.
            try s.dirty(writes: 5, maxOffset: 400 << 20)
            try s.backup()
            try s.expectRestore(s.references.count - 1, equals: s.references.last!)
        }
    }

    @Test func verifyCatchesAFlippedByteInAnyLayer() throws {
        let s = try BackupScenario(size: "128M", seed: 21)
        try s.dirty(writes: 20, maxOffset: 100 << 20)
        try s.backup()
        try s.dirty(writes: 5, maxOffset: 100 << 20)
        try s.backup()
        try s.qbackup(["verify", s.repo])
        for layer in try s.layers() {
            let path = s.layerPath(layer)
            let size = UInt64(layer["file-size"] as? Int ?? 0)
            let at = size / 2 + 13
            let original = try peek(path, at: at, count: 1)
            try poke(path, at: at, [original[0] ^ 0x01])
            let out = try s.qbackup(["verify", s.repo], expect: 1)
            #expect(out.stdout.contains(layer["file"] as? String ?? "?") && out.stdout.contains("checksum"),
                    "\(out.stdout)")
            try poke(path, at: at, original)
        }
        try s.qbackup(["verify", s.repo])
    }

    @Test func verifyImageCatchesAWriteTheBitmapMissed() throws {
        let s = try BackupScenario(size: "128M", seed: 22)
        try s.dirty(writes: 20, maxOffset: 100 << 20)
        try s.backup()
        let name = try s.layers().isEmpty ? "" : (try JSONHelpers.parse(try s.qbackup(["list", s.repo, "--output", "json"]).stdout)
            as? [String: Any])?["bitmap"] as? String ?? ""
        try Tools.qemuImg("bitmap", "--disable", s.disk, name)
        try Tools.qemuIO(s.disk, format: "qcow2", ["write -P 0x77 5242880 4096"])
        try Tools.qemuImg("bitmap", "--enable", s.disk, name)
        let out = try s.qbackup(["verify", s.repo, "--image", s.disk, "--output", "json"], expect: 1)
        let json = try JSONHelpers.parse(out.stdout) as? [String: Any]
        let missed = json?["missed-offsets"] as? [Int] ?? []
        #expect(missed.contains { $0 <= 5_242_880 && 5_242_880 < $0 + 65536 }, "\(out.stdout)")
    }

    @Test func refusals() throws {
        let s = try BackupScenario(size: "64M", seed: 23)
        try s.dirty(writes: 5, maxOffset: 60 << 20)
        // A dry run before the first backup plans a full one and creates nothing.
        let plan = try s.qbackup(["backup", s.disk, "--repo", s.repo, "--dry-run", "--output", "json"])
        #expect((try JSONHelpers.parse(plan.stdout) as? [String: Any])?["kind"] as? String == "full")
        #expect(!FileManager.default.fileExists(atPath: s.repo))
        // No full backup yet: --incremental is refused.
        let first = try s.qbackup(["backup", s.disk, "--repo", s.repo, "--incremental"], expect: 1)
        #expect(first.stderr.hasPrefix("qbackup: error:"))
        try s.backup()
        let name = (try JSONHelpers.parse(try s.qbackup(["list", s.repo, "--output", "json"]).stdout)
            as? [String: Any])?["bitmap"] as? String ?? ""
        // A disabled bitmap: --incremental refuses (the bitmap left as it was), auto takes a full layer and says why.
        try Tools.qemuImg("bitmap", "--disable", s.disk, name)
        let disabled = try s.qbackup(["backup", s.disk, "--repo", s.repo, "--incremental"], expect: 1)
        #expect(disabled.stderr.contains("disabled") && disabled.stderr.contains("full backup"))
        let disabledAuto = try JSONHelpers.parse(try s.qbackup(["backup", s.disk, "--repo", s.repo, "--output", "json"]).stdout)
            as? [String: Any]
        #expect(disabledAuto?["kind"] as? String == "full")
        #expect((disabledAuto?["reason"] as? String ?? "").contains("disabled"))
        // A missing bitmap: the same.
        try Tools.qemuImg("bitmap", "--remove", s.disk, name)
        let missing = try s.qbackup(["backup", s.disk, "--repo", s.repo, "--incremental"], expect: 1)
        #expect(missing.stderr.contains("missing"))
        let missingAuto = try s.qbackup(["backup", s.disk, "--repo", s.repo])
        #expect(missingAuto.stdout.contains("full backup") && missingAuto.stdout.contains("missing"))
        // Another disk is refused.
        let other = s.dir.file("other.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", other, "64M")
        let wrong = try s.qbackup(["backup", other, "--repo", s.repo], expect: 1)
        #expect(wrong.stderr.contains("another disk"))
        // Dry run changes nothing.
        try s.dirty(writes: 3, maxOffset: 60 << 20)
        let before = try Data.contents(of: s.disk)
        let manifest = try Data.contents(of: s.repo + "/manifest.json")
        let dry = try s.qbackup(["backup", s.disk, "--repo", s.repo, "--dry-run", "--output", "json"])
        let json = try JSONHelpers.parse(dry.stdout) as? [String: Any]
        #expect(json?["dry-run"] as? Bool == true)
        #expect((json?["bytes-copied"] as? Int ?? 0) > 0)
        #expect(try Data.contents(of: s.disk) == before)
        #expect(try Data.contents(of: s.repo + "/manifest.json") == manifest)
    }

    @Test func backupRefusesAnImageHeldByQemuNBD() throws {
        let s = try BackupScenario(size: "64M", seed: 24)
        try s.dirty(writes: 5, maxOffset: 60 << 20)
        let nbd = try QemuNBD(image: s.disk, bitmap: nil, directory: s.dir, readOnly: false)
        defer { nbd.stop() }
        let before = try Data.contents(of: s.disk)
        // Busy (75): the image is locked by QEMU.
        let out = try s.qbackup(["backup", s.disk, "--repo", s.repo], expect: 75)
        #expect(out.stderr.contains("lock"), "\(out.stderr)")
        #expect(try Data.contents(of: s.disk) == before)
    }

    @Test func twoRepositoriesAndAGrowingDisk() throws {
        let s = try BackupScenario(size: "64M", seed: 25)
        let offsite = s.dir.file("offsite")
        var offsiteRefs: [String] = []
        try s.dirty(writes: 10, maxOffset: 60 << 20)
        try s.backup()
        try s.qbackup(["backup", s.disk, "--repo", offsite])
        offsiteRefs.append(s.references.last!)
        for round in 0..<3 {
            try s.dirty(writes: 6, maxOffset: 60 << 20)
            if round == 1 {
                try Tools.qemuImg("resize", "-f", "qcow2", s.disk, "96M")
                try s.dirty(writes: 4)  // some beyond the old end
            }
            try s.backup()
            try s.dirty(writes: 3, maxOffset: 60 << 20)
            try s.qbackup(["backup", s.disk, "--repo", offsite])
            try s.snapshotReference()
            offsiteRefs.append(s.references.removeLast())
        }
        for (k, reference) in s.references.enumerated() {
            try s.expectRestore(k, equals: reference)
            let layers = try s.layers()
            let size = layers[k]["virtual-size"] as? Int ?? 0
            let refSize = try FileManager.default.attributesOfItem(atPath: reference)[.size] as? Int ?? -1
            #expect(size == refSize, "layer \(k) has size \(size), its point had \(refSize)")
        }
        let main = s.repo
        for (k, reference) in offsiteRefs.enumerated() {
            let out = s.dir.file("off-\(k).raw")
            try s.qbackup(["restore", offsite, "--to", out, "--at", String(k), "--format", "raw"])
            #expect(try s.same(out, reference), "offsite layer \(k)")
        }
        try s.qbackup(["verify", main, "--image", s.disk])
        try s.qbackup(["verify", offsite, "--image", s.disk])

        // Merges across the growth (point 2 is larger than the full layer: written anew) and
        // before it (layers of one size: committed in place) keep every remaining point.
        try s.qbackup(["merge", main, "--keep", "2"])
        for (k, reference) in s.references.enumerated().suffix(2) { try s.expectRestore(k, equals: reference) }
        try s.qbackup(["merge", offsite, "--keep", "3"])
        for (k, reference) in offsiteRefs.enumerated().suffix(3) {
            let out = s.dir.file("off-merged-\(k).raw")
            try s.qbackup(["restore", offsite, "--to", out, "--at", String(k), "--format", "raw"])
            #expect(try s.same(out, reference), "offsite layer \(k) after merge")
        }
        try s.qbackup(["verify", main, "--image", s.disk])
        try s.qbackup(["verify", offsite])
    }
}
