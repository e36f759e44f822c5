import BackupChain
import Crypto
import Foundation
import Testing
import TestSupport

/// Manifest version 2: what backup writes (every field, checked against hashes computed here
/// from the files themselves), the sidecars beside the layers, the upgrade of a version 1
/// repository (a damaged layer reported, never trusted), and the validation of every field.
@Suite struct BackupManifestTests {
    static func json(_ path: String) throws -> [String: Any] {
        try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
    }

    /// SHA-256 of each 4 MiB piece of the file, and of those digests' bytes in order.
    static func chunkDigests(_ path: String) throws -> (chunks: [String], sha256: String) {
        let data = try Data(contentsOf: URL(fileURLWithPath: path))
        var chunks: [String] = []
        var all = SHA256()
        var at = 0
        while at < data.count {
            let digest = SHA256.hash(data: data[at..<min(data.count, at + (4 << 20))])
            chunks.append(digest.map { String(format: "%02x", $0) }.joined())
            all.update(data: Data(digest))
            at += 4 << 20
        }
        return (chunks, all.finalize().map { String(format: "%02x", $0) }.joined())
    }

    static func wholeFileSHA(_ path: String) throws -> String {
        SHA256.hash(data: try Data(contentsOf: URL(fileURLWithPath: path))).map { String(format: "%02x", $0) }.joined()
    }

    /// Three rounds into a scenario; the full layer is more than one chunk.
    static func threeRounds(seed: UInt64) throws -> BackupScenario {
        try BackupScenario.points(3, size: "64M", seed: seed, fullWrites: 60, writes: 6, maxOffset: 60 << 20)
    }

    @Test func backupWritesEveryVersion2FieldAndASidecarPerLayer() throws {
        let s = try Self.threeRounds(seed: 71)
        let m = try Self.json(s.repo + "/manifest.json")
        #expect(m["version"] as? Int == 2)
        #expect(m["format"] as? String == "qbackup-repository")
        let source = try #require(m["source"] as? [String: Any])
        #expect(source["kind"] as? String == "file")
        #expect(source["path"] as? String == URL(fileURLWithPath: s.disk).resolvingSymlinksInPath().path)
        #expect((m["bitmap"] as? String)?.hasPrefix("qbackup-") == true)
        #expect((m["journal"] as? [Any])?.isEmpty == true)
        let layers = try #require(m["layers"] as? [[String: Any]])
        #expect(layers.count == 3)
        for (i, layer) in layers.enumerated() {
            let file = try #require(layer["file"] as? String)
            let path = s.repo + "/" + file
            #expect(layer["index"] as? Int == i)
            #expect(layer["mode"] as? String == "offline")
            #expect(layer["chunk-size"] as? Int == 4 << 20)
            let (chunks, sha) = try Self.chunkDigests(path)
            #expect(layer["chunks"] as? [String] == chunks)
            #expect(layer["sha256"] as? String == sha)
            let size = try FileManager.default.attributesOfItem(atPath: path)[.size] as? Int
            #expect(layer["file-size"] as? Int == size)
            var st = stat()
            #expect(lstat(path, &st) == 0)
            let identity = try #require(layer["identity"] as? [String: Any])
            #expect(identity["inode"] as? Int == Int(st.st_ino))
            #expect(identity["size"] as? Int == Int(st.st_size))
            #expect(identity["mtime"] as? Int == st.st_mtim.tv_sec * 1_000_000_000 + st.st_mtim.tv_nsec)
            // The sidecar holds the same record and names the repository.
            let sidecar = try Self.json(path + ".json")
            #expect(sidecar["format"] as? String == "qbackup-layer")
            #expect((sidecar["repository"] as? [String: Any])?["id"] as? String == m["id"] as? String)
            #expect(NSDictionary(dictionary: sidecar["layer"] as? [String: Any] ?? [:]).isEqual(to: layer))
        }
        #expect(try Self.chunkDigests(s.repo + "/" + (layers[0]["file"] as? String ?? "")).chunks.count > 1,
                "the full layer should span several chunks")
        try s.qbackup(["verify", s.repo])
    }

    /// Rewrites a repository's version 2 manifest as version 1 wrote it (whole-file checksums, no sidecars).
    static func downgrade(_ s: BackupScenario) throws {
        var m = try json(s.repo + "/manifest.json")
        let source = (m["source"] as? [String: Any])?["path"] as? String ?? ""
        let layers = (m["layers"] as? [[String: Any]] ?? []).map { layer -> [String: Any] in
            let file = layer["file"] as? String ?? ""
            return ["file": file, "kind": layer["kind"] ?? "", "created": layer["created"] ?? "",
                    "bytes-copied": layer["bytes-copied"] ?? 0, "file-size": layer["file-size"] ?? 0,
                    "virtual-size": layer["virtual-size"] ?? 0,
                    "sha256": (try? wholeFileSHA(s.repo + "/" + file)) ?? ""]
        }
        m = ["format": "qbackup-repository", "version": 1, "id": m["id"] ?? "", "virtual-size": m["virtual-size"] ?? 0,
             "cluster-size": m["cluster-size"] ?? 0, "bitmap": m["bitmap"] ?? "", "source": source, "layers": layers]
        try JSONSerialization.data(withJSONObject: m).write(to: URL(fileURLWithPath: s.repo + "/manifest.json"))
        // (An old qbackup made no sidecars: then there are none to remove.)
        for layer in layers { try? FileManager.default.removeItem(atPath: s.repo + "/\(layer["file"] ?? "").json") }
    }

    @Test func aVersion1RepositoryIsUpgradedOnTheNextBackup() throws {
        let s = try Self.threeRounds(seed: 72)
        try Self.downgrade(s)
        // Read as it is: list, verify and restore work on version 1.
        try s.qbackup(["verify", s.repo])
        try s.expectRestore(1, equals: s.references[1])
        try s.dirty(writes: 4, maxOffset: 60 << 20)
        let out = try s.backup()
        #expect(out["kind"] as? String == "incremental")
        let m = try Self.json(s.repo + "/manifest.json")
        #expect(m["version"] as? Int == 2)
        let layers = try #require(m["layers"] as? [[String: Any]])
        #expect(layers.map { $0["index"] as? Int } == [0, 1, 2, 3])
        for layer in layers {
            let path = s.repo + "/" + (layer["file"] as? String ?? "")
            #expect(layer["sha256"] as? String == (try Self.chunkDigests(path)).sha256)
            #expect(layer["identity"] != nil)
            #expect(FileManager.default.fileExists(atPath: path + ".json"), "no sidecar for \(path)")
        }
        for (k, reference) in s.references.enumerated() { try s.expectRestore(k, equals: reference) }
        try s.qbackup(["verify", s.repo, "--image", s.disk])
    }

    @Test func aDamagedVersion1LayerIsReportedNotTrusted() throws {
        let s = try Self.threeRounds(seed: 73)
        try Self.downgrade(s)
        let m = try Self.json(s.repo + "/manifest.json")
        let last = ((m["layers"] as? [[String: Any]])?.last?["file"] as? String) ?? ""
        let damagedPath = s.repo + "/" + last
        let middle = UInt64(try FileManager.default.attributesOfItem(atPath: damagedPath)[.size] as? Int ?? 0) / 2
        try poke(damagedPath, at: middle, [try peek(damagedPath, at: middle, count: 1)[0] ^ 0x40])
        try s.dirty(writes: 4, maxOffset: 60 << 20)
        // --incremental refuses: the chain it would extend holds a damaged layer.
        let refused = try s.qbackup(["backup", s.disk, "--repo", s.repo, "--incremental"], expect: 1)
        #expect(refused.stderr.contains("damaged"), "\(refused.stderr)")
        // Auto takes a full layer and says why; the damaged layer is recorded as damaged, not re-hashed.
        let auto = try s.backup()
        #expect(auto["kind"] as? String == "full")
        #expect((auto["reason"] as? String ?? "").contains("damaged"))
        let after = try Self.json(s.repo + "/manifest.json")
        let layers = try #require(after["layers"] as? [[String: Any]])
        #expect(after["version"] as? Int == 2)
        #expect(layers[2]["damaged"] != nil)
        #expect(layers[2]["chunks"] == nil)
        let verify = try s.qbackup(["verify", s.repo], expect: 1)
        #expect((verify.stdout + verify.stderr).contains(last))
        try s.expectRestore(3, equals: s.references[3])
    }

    /// Each field of a version 2 manifest is validated on load: one change makes it refused.
    @Test func everyFieldIsValidatedOnLoad() throws {
        let s = try BackupScenario(size: "16M", seed: 74)
        try s.dirty(writes: 4, maxOffset: 15 << 20)
        try s.backup()
        try s.dirty(writes: 2, maxOffset: 15 << 20)
        try s.backup()
        let good = try Data(contentsOf: URL(fileURLWithPath: s.repo + "/manifest.json"))
        _ = try BackupManifest(validating: good, path: "m")
        typealias Edit = (inout [String: Any]) -> Void
        func layer(_ i: Int, _ edit: @escaping (inout [String: Any]) -> Void) -> Edit {
            { m in
                var layers = m["layers"] as? [[String: Any]] ?? []
                edit(&layers[i])
                m["layers"] = layers
            }
        }
        let edits: [(String, Edit)] = [
            ("indices not increasing", layer(1) { $0["index"] = 0 }),
            ("negative index", layer(0) { $0["index"] = -1 }),
            ("a chunk too few", layer(0) { $0["chunks"] = [] }),
            ("a chunk digest not hex", layer(1) { l in l["chunks"] = (l["chunks"] as? [String] ?? []).map { _ in String(repeating: "g", count: 64) } }),
            ("sha256 not the digest of the chunks", layer(1) { $0["sha256"] = String(repeating: "0", count: 64) }),
            ("chunk-size not 4 MiB", layer(0) { $0["chunk-size"] = 1 << 20 }),
            ("identity missing", layer(0) { $0["identity"] = nil }),
            ("identity size differs", layer(0) { l in var id = l["identity"] as? [String: Any] ?? [:]; id["size"] = 1; l["identity"] = id }),
            ("file name with a slash", layer(0) { $0["file"] = "../x.qcow2" }),
            ("unknown mode", layer(0) { $0["mode"] = "telepathy" }),
            ("relative source path", { m in m["source"] = ["kind": "file", "path": "disk.qcow2"] }),
            ("libvirt source without a UUID", { m in m["source"] = ["kind": "libvirt", "disk": "vda", "uri": "qemu:///system"] }),
            ("journal file with a slash", { m in m["journal"] = [["file": "a/b"]] }),
            ("journal entry naming nothing", { m in m["journal"] = [[String: Any]()] }),
            ("replica-of not hex", { m in m["replica-of"] = "xyz" }),
            ("version 3", { m in m["version"] = 3 }),
        ]
        for (what, edit) in edits {
            var m = try #require(try JSONSerialization.jsonObject(with: good) as? [String: Any])
            edit(&m)
            let bad = try JSONSerialization.data(withJSONObject: m)
            #expect(throws: (any Error).self, "\(what) was accepted") { try BackupManifest(validating: bad, path: "m") }
        }
    }

    /// A replica's journal entry for a received fold (issue 16 item D) is validated with the
    /// manifest: a fold that takes the place of a run of its points loads, each bad field is refused.
    @Test func aReceivedFoldInTheJournalIsValidated() throws {
        let s = try BackupScenario(size: "16M", seed: 75)
        try s.dirty(writes: 4, maxOffset: 15 << 20)
        try s.backup()
        try s.dirty(writes: 2, maxOffset: 15 << 20)
        try s.backup()
        let good = try Data(contentsOf: URL(fileURLWithPath: s.repo + "/manifest.json"))
        let base = try #require(try JSONSerialization.jsonObject(with: good) as? [String: Any])
        let layers = base["layers"] as? [[String: Any]] ?? []
        func manifest(_ edit: (inout [String: Any]) -> Void) throws -> Data {
            var layer = layers[1]
            layer["kind"] = "full"
            var fold: [String: Any] = ["layer": layer, "replaces": [layers[0]["index"] ?? 0, layers[1]["index"] ?? 0],
                                       "temp": "\(layer["file"] ?? "").partial"]
            edit(&fold)
            var m = base
            m["journal"] = [["fold": fold]]
            return try JSONSerialization.data(withJSONObject: m)
        }
        let loaded = try BackupManifest(validating: try manifest { _ in }, path: "m")
        #expect(loaded.receivedFold?.replaces.count == 2)
        let edits: [(String, (inout [String: Any]) -> Void)] = [
            ("replaces out of order", { $0["replaces"] = [layers[1]["index"] ?? 0, layers[0]["index"] ?? 0] }),
            ("replaces a point the manifest lacks", { $0["replaces"] = [99] }),
            ("replaces nothing", { $0["replaces"] = [Int]() }),
            ("temp outside the folder", { $0["temp"] = "../x.partial" }),
            ("an incremental layer at the start of the chain", { f in var l = f["layer"] as? [String: Any] ?? [:]; l["kind"] = "incremental"; f["layer"] = l }),
            ("a sha256 that is not its chunks'", { f in var l = f["layer"] as? [String: Any] ?? [:]; l["sha256"] = String(repeating: "0", count: 64); f["layer"] = l }),
            ("another file name than the point's", { f in var l = f["layer"] as? [String: Any] ?? [:]; l["file"] = "full-20260101T000000Z.qcow2"; f["layer"] = l }),
        ]
        for (what, edit) in edits {
            let bad = try manifest(edit)
            #expect(throws: (any Error).self, "\(what) was accepted") { try BackupManifest(validating: bad, path: "m") }
        }
    }
}
