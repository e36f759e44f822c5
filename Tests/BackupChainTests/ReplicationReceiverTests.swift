import BackupChain
import Foundation
import Testing
import TestSupport

/// Hostile replication streams (issue 16): cut at every record boundary and at random bytes,
/// random byte flips, another repository's stream, streams that do not fit, absurd lengths.
/// Each ends in an error, and the destination is as it was plus the complete layers before
/// the damage — never a partial layer, never a crash or unbounded memory.
@Suite struct ReplicationReceiverTests {
    /// Receives `bytes` into `dst` in-process: nil on success, else the error.
    /// In-process calls wait this long for a repository's lock (seconds). Another test of the
    /// same process that starts a child at that moment holds a copy of our descriptors until the
    /// child's exec closes them (O_CLOEXEC), so a lock closed a moment ago may still look held
    /// to the next call of ours; the real binary, one process per command, has no such window.
    static let lockWait = 10.0

    static func receive(_ bytes: [UInt8], into dst: String) -> Error? {
        do {
            _ = try ReplicationReceiver.receive(repository: dst, from: MemoryStream(bytes), wait: lockWait)
            return nil
        } catch {
            return error
        }
    }

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
        func receive(_ bytes: [UInt8], into dst: String) -> Error? { ReplicationReceiverTests.receive(bytes, into: dst) }

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
            ("a stream of version 3", ReplicationStream.preamble(version: 3) + Array(header.dropFirst(16))),
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

    // MARK: - Folds (merges at the source)

    /// A replica of four points, then `merge --keep 2` and one more night at the source: the
    /// stream `send --have` makes for it (a fold of point 2 replacing 0, 1, 2 against the
    /// replica's full layer, then a new layer), and the replica's states it may pass through.
    final class FoldFixture {
        let s: BackupScenario
        let template: String
        let streamFile: String
        let stream: [UInt8]
        /// The replica's points (index, sha256) after each section of the stream: [0] before it.
        let states: [[ReplicationStream.Point]]
        let work = TempDir("qbackup-fold")

        init(seed: UInt64) throws {
            s = try BackupScenario(size: "24M", seed: seed)
            try Tools.qemuIO(s.disk, format: "qcow2", ["write -P 0x33 0 16M"])
            for k in 0..<4 {
                try s.dirty(writes: k == 0 ? 12 : 3, zeroes: 1, maxOffset: k == 0 ? 20 << 20 : 4 << 20)
                try s.backup()
            }
            template = s.dir.file("replica")
            let out = MemoryStream()
            _ = try ReplicationSender.send(ReplicationSender.Request(repository: s.repo), to: out)
            _ = try ReplicationReceiver.receive(repository: template, from: MemoryStream(out.bytes))
            try s.qbackup(["merge", s.repo, "--keep", "2"])
            try s.dirty(writes: 2, maxOffset: 4 << 20)
            try s.backup()
            let have = s.dir.file("have.json")
            try s.qbackup(["list", template, "--output", "json"]).stdout.write(toFile: have, atomically: true, encoding: .utf8)
            streamFile = s.dir.file("fold.stream")
            let q = try QBackupBinary.path()
            let sent = try Tools.run("/bin/bash", ["-c", "\"$0\" send \"$1\" --have \"$2\" > \"$3\"", q, s.repo, have, streamFile])
            #expect(sent.status == 0, "send --have after a merge: \(sent.stderr)")
            stream = [UInt8](try Data.contents(of: streamFile))
            // The states, from the stream's own records: a layer appends its point, a fold takes the place of its run.
            var state = try Self.points(template)
            var found = [state]
            for record in ReplicationStream.records(in: stream) where [2, 6].contains(record.type) {
                let json = try JSONSerialization.jsonObject(with: Data(stream[(record.range.lowerBound + 12)..<record.range.upperBound])) as? [String: Any]
                let layer = (record.type == 6 ? json?["layer"] as? [String: Any] : json) ?? [:]
                let point = ReplicationStream.Point(index: layer["index"] as? Int ?? -1, sha256: layer["sha256"] as? String ?? "")
                let replaces = Set(json?["replaces"] as? [Int] ?? [])
                state = state.filter { !replaces.contains($0.index) } + [point]
                state.sort { $0.index < $1.index }
                found.append(state)
            }
            states = found
            #expect(states.count == 3, "sections: \(states.count - 1)")
            #expect(try states.last == Self.points(s.repo), "the stream does not lead to the source's points")
        }

        /// Receives `bytes` into `dst` in-process: nil on success, else the error.
        func receive(_ bytes: [UInt8], into dst: String) -> Error? { ReplicationReceiverTests.receive(bytes, into: dst) }

        static func points(_ dir: String) throws -> [ReplicationStream.Point] {
            try BackupRepository(path: dir, exclusive: false, wait: lockWait).manifest?.layers.map(ReplicationStream.Point.init) ?? []
        }

        /// A fresh copy of the replica as it was before the stream.
        func copy(_ name: String) throws -> String {
            let dst = work.file(name)
            try Tools.run("cp", ["-a", "--sparse=always", template, dst])
            return dst
        }

        /// How many sections (layers and folds) are complete in the first `length` bytes.
        func completeSections(before length: Int) -> Int {
            ReplicationStream.records(in: stream).filter { $0.type == ReplicationStream.RecordType.layerEnd.rawValue && $0.range.upperBound <= length }.count
        }

        /// `dst` holds the points of one of the states, a replica whose layers verify, no temporary file.
        func expectState(_ dst: String, _ expected: Int, _ step: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let held = try Self.points(dst)
            #expect(held == states[expected], "\(step): the replica holds \(held)", sourceLocation: sourceLocation)
            let report = try ChainVerifier.verify(repository: dst, wait: lockWait)
            #expect(report.ok, "\(step): \(report.problems)", sourceLocation: sourceLocation)
        }

        /// The next replicate (the real binary, or in this process) completes `dst`: the source's
        /// points and files exactly, nothing else left.
        func expectCompletes(_ dst: String, _ step: String, binary: Bool = true, sourceLocation: SourceLocation = #_sourceLocation)
            throws
        {
            if binary {
                let r = try QBackupBinary.run(["replicate", s.repo, dst])
                #expect(r.status == 0, "\(step): the next replicate: \(r.stderr)", sourceLocation: sourceLocation)
            } else {
                _ = try Replicator.replicate(Replicator.Request(repository: s.repo, destination: .folder(dst), wait: lockWait))
            }
            #expect(try Self.points(dst) == states.last, "\(step): after the next replicate", sourceLocation: sourceLocation)
            #expect(try ReplicationTests.layerFiles(dst) == ReplicationTests.layerFiles(s.repo), "\(step): the files differ",
                    sourceLocation: sourceLocation)
            let names = try FileManager.default.contentsOfDirectory(atPath: dst)
            #expect(Set(names) == Set(try FileManager.default.contentsOfDirectory(atPath: s.repo)), "\(step): \(names.sorted())",
                    sourceLocation: sourceLocation)
        }
    }

    /// Issue 16 item D: a fold cut at every record boundary and at random bytes, and 8
    /// single-byte flips: always an error, and the replica holds its old
    /// points (or, for a cut after the fold's end, exactly the points after it), verifies, and
    /// the next replicate completes it.
    @Test func aCutOrDamagedFoldLeavesTheOldPointsOrTheNew() throws {
        let f = try FoldFixture(seed: 33)
        let records = ReplicationStream.records(in: f.stream)
        #expect(records.contains { $0.type == ReplicationStream.RecordType.copy.rawValue }, "the fold copies nothing from the replica")
        var random = SeededRandom(seed: 34)
        let cuts = records.map(\.range.lowerBound) + (0..<6).map { _ in Int(random.next() % UInt64(f.stream.count)) }
        for cut in Set(cuts).sorted() where cut < f.stream.count {
            let dst = try f.copy("cut-\(cut)")
            let error = f.receive(Array(f.stream[0..<cut]), into: dst)
            #expect(error != nil, "a fold stream cut at byte \(cut) of \(f.stream.count) was accepted")
            try f.expectState(dst, f.completeSections(before: cut), "cut at \(cut)")
            try f.expectCompletes(dst, "cut at \(cut)", binary: false)
            try FileManager.default.removeItem(atPath: dst)
        }
        for round in 0..<8 {
            var damaged = f.stream
            let at = 16 + Int(random.next() % UInt64(damaged.count - 16))
            damaged[at] ^= UInt8(1 + random.next() % 255)
            let dst = try f.copy("flip-\(round)")
            #expect(f.receive(damaged, into: dst) != nil, "a flip at byte \(at) was accepted")
            let record = records.first { $0.range.contains(at) }
            try f.expectState(dst, f.completeSections(before: record?.range.lowerBound ?? 0), "flip at \(at)")
            try f.expectCompletes(dst, "flip at \(at)", binary: false)
            try FileManager.default.removeItem(atPath: dst)
        }
        let whole = try f.copy("whole")
        #expect(f.receive(f.stream, into: whole) == nil)
        try f.expectState(whole, 2, "the whole stream")
    }

    /// Issue 16 item D: the real `receive` of a fold killed (SIGKILL) at every write and fsync it
    /// makes (QBACKUP_CRASH_AFTER), then the next command that opens the replica — `list` or
    /// `verify` — finds exactly the points before the fold, or after it (an interrupted switch is
    /// finished), the replica verifies, and the next replicate ends with the source's points.
    @Test func aKilledReceiveOfAFoldIsFinishedOrLeftAsItWas() throws {
        let f = try FoldFixture(seed: 36)
        let q = try QBackupBinary.path()
        var seen = Set<Int>()
        let outcome = try CrashPoints.enumerate(limit: 600, denseSteps: 80, stride: 3) { n, crashAfter in
            let dst = try f.copy("kill-\(n)")
            let result = try Tools.run("/bin/bash", ["-c", "exec \"$0\" receive \"$1\" < \"$2\"", q, dst, f.streamFile],
                                       environment: crashAfter)
            if result.status != 0 {
                #expect(result.status == 128 + SIGKILL || result.status == SIGKILL, "step \(n): \(result.status) \(result.stderr)")
            }
            let next = n % 2 == 0 ? ["list", dst, "--output", "json"] : ["verify", dst]
            let opened = try QBackupBinary.run(next)
            #expect(opened.status == 0, "step \(n): \(next[0]) after the kill: \(opened.stderr)")
            let points = try FoldFixture.points(dst)
            let state = f.states.firstIndex(of: points)
            #expect(state != nil, "step \(n): the replica holds \(points), none of the states \(f.states)")
            if let state { seen.insert(state) }
            try f.expectCompletes(dst, "step \(n)")
            try FileManager.default.removeItem(atPath: dst)
            return result
        }
        print("fold receive crash points: \(outcome.crashes), states seen after a kill: \(seen.sorted())")
        #expect(outcome.completed, "receive never completed within the steps tried")
        #expect(outcome.crashes >= 10, "only \(outcome.crashes) crash points were exercised")
        #expect(seen.isSuperset(of: [0, 1]), "no kill fell before and after the fold's switch: \(seen.sorted())")
    }

    /// Issue 16 item D, the journal's other way out: a receive killed just after the fold's
    /// record became durable, with its received file put back under the temporary name (as before
    /// the rename). The next `list` renames and switches it in (the file is the one recorded:
    /// same inode, size and mtime); in a copy of that folder (`cp -a`: a new inode) the file is not
    /// the recorded one, so the fold is undone — the journal forgets it, the replica lists its old
    /// points — and the next replicate builds the fold again and completes it.
    @Test func aFoldIsSwitchedInOnlyWithTheFileItRecorded() throws {
        let f = try FoldFixture(seed: 37)
        let q = try QBackupBinary.path()
        func journalFold(_ dir: String) throws -> [String: Any]? {
            let m = try JSONSerialization.jsonObject(with: Data.contents(of: dir + "/manifest.json")) as? [String: Any]
            return (m?["journal"] as? [[String: Any]] ?? []).lazy.compactMap { $0["fold"] as? [String: Any] }.first
        }
        var killed: String?
        for n in 1..<300 {
            let dst = try f.copy("step-\(n)")
            let r = try Tools.run("/bin/bash", ["-c", "exec \"$0\" receive \"$1\" < \"$2\"", q, dst, f.streamFile],
                                  environment: ["QBACKUP_CRASH_AFTER": String(n)])
            if try journalFold(dst) != nil {
                killed = dst
                break
            }
            try FileManager.default.removeItem(atPath: dst)
            try #require(r.status != 0, "receive completed before a kill left its fold in the journal")
        }
        let dst = try #require(killed)
        let fold = try #require(try journalFold(dst))
        let temp = try #require(fold["temp"] as? String)
        let file = try #require((fold["layer"] as? [String: Any])?["file"] as? String)
        #expect(!FileManager.default.fileExists(atPath: "\(dst)/\(temp)"))
        try FileManager.default.moveItem(atPath: "\(dst)/\(file)", toPath: "\(dst)/\(temp)")
        let changed = f.work.file("changed")
        try Tools.run("cp", ["-a", "--sparse=always", dst, changed])

        #expect(try QBackupBinary.run(["list", dst, "--output", "json"]).status == 0)
        #expect(try journalFold(dst) == nil)
        try f.expectState(dst, 1, "the recorded file, back under its temporary name")
        try f.expectCompletes(dst, "the recorded file")

        #expect(try QBackupBinary.run(["list", changed, "--output", "json"]).status == 0)
        #expect(try journalFold(changed) == nil)
        #expect(try FoldFixture.points(changed) == f.states[0], "a fold with a file that is not the recorded one was switched in")
        try f.expectCompletes(changed, "a file that is not the recorded one")
    }
}
