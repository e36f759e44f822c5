import BackupChain
import Foundation
import Testing
import TestSupport

/// Hostile replication streams (issue 16): cut at every record boundary and at random bytes,
/// random byte flips, another repository's stream, streams that do not fit, absurd lengths.
/// Each ends in an error, and the destination is as it was plus the complete layers before
/// the damage — never a partial layer, never a crash or unbounded memory.
@Suite struct ReplicationReceiverTests {
    /// A small repository by real backups (zstd full, plain incrementals) and its stream.
    final class Fixture {
        let s: BackupScenario
        let stream: [UInt8]
        let files: [String: String]
        let layerFiles: [String]

        init(seed: UInt64, points: Int = 3) throws {
            s = try BackupScenario(size: "24M", seed: seed)
            for k in 0..<points {
                try s.dirty(writes: k == 0 ? 20 : 4, zeroes: 1, maxOffset: 20 << 20)
                try s.backup(k == 0 ? ["--compress", "zstd"] : [])
            }
            let out = MemoryStream()
            _ = try ReplicationSender.send(ReplicationSender.Request(repository: s.repo), to: out)
            stream = out.bytes
            files = try ReplicationTests.layerFiles(s.repo)
            layerFiles = try s.layers().map { $0["file"] as? String ?? "" }
        }

        /// Receives `bytes` into `dst` in-process: nil on success, else the error.
        func receive(_ bytes: [UInt8], into dst: String) -> Error? {
            do {
                _ = try ReplicationReceiver.receive(repository: dst, from: MemoryStream(bytes))
                return nil
            } catch {
                return error
            }
        }

        /// `dst` holds exactly the first `count` layers, byte-identical, and nothing partial.
        func expectPrefix(_ dst: String, _ count: Int, _ step: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: dst)) ?? []
            #expect(!names.contains { $0.hasSuffix(".partial") || $0.hasSuffix(".tmp") }, "\(step): \(names)",
                    sourceLocation: sourceLocation)
            let expected = Dictionary(uniqueKeysWithValues: layerFiles.prefix(count).map { ($0, files[$0] ?? "") })
            let held = FileManager.default.fileExists(atPath: dst) ? try ReplicationTests.layerFiles(dst) : [:]
            #expect(held == expected, "\(step): the destination holds \(held.keys.sorted()), expected \(expected.keys.sorted())",
                    sourceLocation: sourceLocation)
            if count == 0 {
                #expect(!FileManager.default.fileExists(atPath: dst + "/manifest.json"), "\(step)", sourceLocation: sourceLocation)
                return
            }
            let list = try QBackupBinary.run(["list", dst, "--output", "json"])
            let layers = (try JSONHelpers.parse(list.stdout) as? [String: Any])?["layers"] as? [[String: Any]] ?? []
            #expect(layers.map { $0["file"] as? String ?? "" } == Array(layerFiles.prefix(count)), "\(step)",
                    sourceLocation: sourceLocation)
        }

        /// How many layers are complete in the first `length` bytes of the stream (their end record read).
        func completeLayers(before length: Int) -> Int {
            ReplicationStream.records(in: stream).filter { $0.type == ReplicationStream.RecordType.layerEnd.rawValue && $0.range.upperBound <= length }.count
        }
    }

    @Test func aCutStreamKeepsTheCompleteLayersOnly() throws {
        let f = try Fixture(seed: 31)
        let records = ReplicationStream.records(in: f.stream)
        #expect(records.last?.range.upperBound == f.stream.count)
        #expect(records.count >= 9, "\(records.count) records")
        var random = SeededRandom(seed: 32)
        let cuts = [0, 5] + records.map(\.range.lowerBound) + records.map { $0.range.lowerBound + 7 }
            + (0..<12).map { _ in Int(random.next() % UInt64(f.stream.count)) }
        for cut in Set(cuts).sorted() where cut < f.stream.count {
            let dst = f.s.dir.file("cut-\(cut)")
            let error = f.receive(Array(f.stream[0..<cut]), into: dst)
            #expect(error != nil, "a stream cut at byte \(cut) of \(f.stream.count) was accepted")
            try f.expectPrefix(dst, f.completeLayers(before: cut), "cut at \(cut)")
            // The next receive of the rest (what replicate sends next) completes the replica.
            let have = f.completeLayers(before: cut)
            if have > 0 && have < f.layerFiles.count {
                let out = MemoryStream()
                _ = try ReplicationSender.send(ReplicationSender.Request(repository: f.s.repo, after: try Self.index(f, have - 1)), to: out)
                #expect(f.receive(out.bytes, into: dst) == nil, "the rest after a cut at \(cut)")
                try f.expectPrefix(dst, f.layerFiles.count, "the rest after a cut at \(cut)")
            }
        }
        let whole = f.s.dir.file("whole")
        #expect(f.receive(f.stream, into: whole) == nil)
        try f.expectPrefix(whole, f.layerFiles.count, "the whole stream")
    }

    static func index(_ f: Fixture, _ position: Int) throws -> Int {
        try f.s.layers()[position]["index"] as? Int ?? -1
    }

    /// Every flipped byte is caught (CRC-32 per record, sha256 per layer): an error, and only
    /// the layers complete before the damaged record.
    @Test(arguments: [41, 42, 43, 44]) func flippedBytesAreCaught(seed: UInt64) throws {
        let f = try Fixture(seed: 40)
        var random = SeededRandom(seed: seed)
        for round in 0..<6 {
            var damaged = f.stream
            let at = Int(random.next() % UInt64(damaged.count))
            damaged[at] ^= UInt8(1 + random.next() % 255)
            let dst = f.s.dir.file("flip-\(seed)-\(round)")
            let error = f.receive(damaged, into: dst)
            #expect(error != nil, "a flip at byte \(at) was accepted")
            // The record the flip is in and everything after it are lost; what came before stays.
            let record = ReplicationStream.records(in: f.stream).first { $0.range.contains(at) }
            try f.expectPrefix(dst, f.completeLayers(before: record?.range.lowerBound ?? 0), "flip at \(at)")
        }
    }

    /// A stream of another repository, or one that does not continue the replica's points, is
    /// refused before anything is written: every file of the replica stays as it was.
    @Test func foreignAndMisfitStreamsChangeNothing() throws {
        let f = try Fixture(seed: 50)
        let other = try Fixture(seed: 51, points: 2)
        let dst = f.s.dir.file("replica")
        #expect(f.receive(f.stream, into: dst) == nil)
        let before = try BackupScenario.digests(dst)
        func expectRefused(_ bytes: [UInt8], _ words: String, _ step: String) {
            let error = f.receive(bytes, into: dst)
            #expect("\(error.map { "\($0)" } ?? "accepted")".contains(words), "\(step): \(String(describing: error))")
            #expect((try? BackupScenario.digests(dst)) == before, "\(step) changed the replica")
        }
        expectRefused(other.stream, "a replica of repository", "another repository's stream")
        expectRefused(f.stream, "does not fit", "the whole stream again")
        let after0 = MemoryStream()
        _ = try ReplicationSender.send(ReplicationSender.Request(repository: f.s.repo, after: try Self.index(f, 0)), to: after0)
        expectRefused(after0.bytes, "does not fit", "a stream after point 0 into a replica of 3 points")
        // Into a repository of its own (not a replica): refused, unchanged.
        let ownBefore = try BackupScenario.digests(other.s.repo)
        let error = f.receive(f.stream, into: other.s.repo)
        #expect("\(error.map { "\($0)" } ?? "accepted")".contains("not a replica"))
        #expect(try BackupScenario.digests(other.s.repo) == ownBefore)
        // Into an empty folder, a stream that continues from points it lacks: nothing is created.
        let fresh = f.s.dir.file("fresh")
        #expect(f.receive(after0.bytes, into: fresh) != nil)
        #expect(!FileManager.default.fileExists(atPath: fresh))
    }

    // MARK: - Absurd lengths, through the binary under a memory bound

    /// Valid framing (CRCs right) around absurd values: each is refused with one error line,
    /// within the memory bound, and the replica is unchanged.
    @Test func absurdLengthsAreRefusedInBoundedMemory() throws {
        let f = try Fixture(seed: 60, points: 2)
        let dst = f.s.dir.file("replica")
        #expect(f.receive(f.stream, into: dst) == nil)
        let before = try BackupScenario.digests(dst)
        let records = ReplicationStream.records(in: f.stream)
        let header = Array(f.stream[0..<records[0].range.upperBound])
        // A header announcing one more layer after the replica's two points.
        let list = try QBackupBinary.run(["list", f.s.repo, "--output", "json"])
        let layers = (try JSONHelpers.parse(list.stdout) as? [String: Any])?["layers"] as? [[String: Any]] ?? []
        let headerJSON = try JSONSerialization.jsonObject(with: Data(f.stream[(records[0].range.lowerBound + 12)..<records[0].range.upperBound])) as? [String: Any] ?? [:]
        var next = headerJSON
        next["base"] = layers.map { ["index": $0["index"] ?? 0, "sha256": $0["sha256"] ?? ""] }
        next["layers"] = 1
        let nextHeader = ReplicationStream.preamble() + ReplicationStream.frame(1, Array(try JSONSerialization.data(withJSONObject: next)))
        func layerRecord(size: UInt64) throws -> [UInt8] {
            let record: [String: Any] = ["index": 9, "file": "incr-20261202T000000Z.qcow2", "kind": "incremental", "mode": "offline",
                                         "created": "2026-12-02T00:00:00Z", "bytes-copied": 0, "file-size": size,
                                         "virtual-size": 25_165_824, "sha256": String(repeating: "a", count: 64)]
            return ReplicationStream.frame(2, Array(try JSONSerialization.data(withJSONObject: record)))
        }
        func be(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> UInt64(8 * (n - 1 - $0))) } }
        let cases: [(String, [UInt8])] = [
            ("a record length of 4 GiB", nextHeader + [2, 0, 0, 0, 0xff, 0xff, 0xff, 0xf0, 0, 0, 0, 0]),
            ("a header record of 4 GiB", ReplicationStream.preamble() + [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4]),
            ("a layer of 1 PiB", nextHeader + (try layerRecord(size: 1 << 50))),
            ("a data record of 4 GiB raw", nextHeader + (try layerRecord(size: 1 << 20))
                + ReplicationStream.frame(3, be(0, 8) + be(0xffff_ffff, 4) + [1, 0, 0, 0] + [UInt8](repeating: 7, count: 64))),
            ("a hole of 2^63 bytes", nextHeader + (try layerRecord(size: 1 << 20)) + ReplicationStream.frame(4, be(0, 8) + be(1 << 63, 8))),
            ("an lz4 frame that claims more than its record", nextHeader + (try layerRecord(size: 1 << 20))
                + ReplicationStream.frame(3, be(0, 8) + be(65536, 4) + [1, 0, 0, 0] + [0x04, 0x22, 0x4d, 0x18, 0x64, 0x70, 0xb9])),
            // 1 TiB of hole hashes as 262144 known zero chunks (no 1 TiB of hashing), then the sha256 differs.
            ("a 1 TiB layer of holes", nextHeader + (try layerRecord(size: 1 << 40)) + ReplicationStream.frame(4, be(0, 8) + be(1 << 40, 8))
                + ReplicationStream.frame(5, [UInt8](repeating: 0xaa, count: 32))),
            ("a stream of version 2", ReplicationStream.preamble(version: 2) + Array(header.dropFirst(16))),
            ("no stream at all", Array("hello\n".utf8)),
        ]
        let binary = try QBackupBinary.path()
        for (what, bytes) in cases {
            let file = f.s.dir.file("absurd-\(UUID().uuidString.prefix(6))")
            try Data(bytes).write(to: URL(fileURLWithPath: file))
            let shell = Bounded.shellCommand([binary, "receive", dst], mebibytes: 512, seconds: 30) + " < '\(file)'"
            let result = try Tools.run("/bin/bash", ["-c", shell])
            #expect(result.failedCleanly, "\(what): status \(result.status): \(result.stderr)")
            #expect(try BackupScenario.digests(dst) == before, "\(what) changed the replica")
        }
    }
}
