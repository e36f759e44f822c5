import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// Every command that writes a file the user named (restore in both formats, flatten in
/// both formats, create) goes through `OutputFile`: a temporary name beside OUT, renamed
/// only when complete. A killed or failed run leaves nothing at OUT that looks complete and
/// never removes what was there; an existing OUT is refused unless --force (issue 11, item 7).
@Suite struct OutputFileTests {
    /// A 24 MiB disk with data in several extents, and a repository with one full backup of it.
    static func fixture(_ dir: TempDir) throws -> (disk: String, repo: String) {
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "24M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x11 0 5M", "write -P 0x22 7M 3M", "write -z 12M 1M",
                                                 "write -P 0x33 15M 6M"])
        let repo = dir.file("repo")
        let backup = try QBackupBinary.run(["backup", disk, "--repo", repo])
        #expect(backup.status == 0, "\(backup.stderr)")
        return (disk, repo)
    }

    /// The names in `folder` other than `keep`.
    static func others(in folder: String, keep: Set<String>) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []).filter { !keep.contains($0) }.sorted()
    }

    static let writers: [[String]] = [
        ["restore", "REPO", "--to", "OUT", "--format", "raw"], ["restore", "REPO", "--to", "OUT", "--format", "qcow2"],
        ["flatten", "DISK", "OUT", "--format", "raw"], ["flatten", "DISK", "OUT"], ["flatten", "DISK", "OUT", "--compress", "zlib"],
    ]

    /// The real binary killed (SIGKILL, through the QBACKUP_CRASH_AFTER seam) before a seeded
    /// random write or fsync: OUT is absent, or still the file that was there before; the only
    /// leftover is one recognisable temporary file.
    @Test(arguments: writers)
    func killedAtSeededMomentsLeavesNoCompleteLookingOutput(_ command: [String]) throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        let out = dir.file("out.img")
        var rng = SeededRandom(seed: UInt64(command.joined().utf8.count) &* 7919)
        var kills = 0
        for round in 0..<8 {
            let previous = round % 2 == 1
            try? FileManager.default.removeItem(atPath: out)
            if previous { try Data("the user's file".utf8).write(to: URL(fileURLWithPath: out)) }
            for name in Self.others(in: dir.path, keep: ["disk.qcow2", "repo"]) where name.contains(".qbackup-") {
                try FileManager.default.removeItem(atPath: dir.file(name))
            }
            // Early points (every output has a few writes) and later ones (qcow2 has many).
            let n = Int.random(in: 1...(round < 5 ? 5 : 40), using: &rng)
            var arguments = command.map { $0 == "REPO" ? repo : $0 == "DISK" ? disk : $0 == "OUT" ? out : $0 }
            if previous { arguments.append("--force") }
            let run = try QBackupBinary.run(arguments, environment: ["QBACKUP_CRASH_AFTER": "\(n)"])
            if run.status == 0 {
                try Tools.qemuImg("compare", "-q", disk, out)
                continue
            }
            #expect(run.status == SIGKILL, "kill point \(n): exit \(run.status): \(run.stderr)")
            kills += 1
            if previous {
                #expect(try Data.contents(of: out) == Data("the user's file".utf8), "kill point \(n): OUT changed")
            } else {
                #expect(!FileManager.default.fileExists(atPath: out), "kill point \(n): OUT exists")
            }
            let left = Self.others(in: dir.path, keep: ["disk.qcow2", "repo", "out.img"])
            #expect(left.count <= 1 && left.allSatisfy { $0.hasPrefix(".out.img.qbackup-") && $0.hasSuffix(".tmp") },
                    "kill point \(n): \(left)")
        }
        #expect(kills >= 4, "only \(kills) of 8 runs were killed")
    }

    /// A kill -9 from outside at a seeded random moment during restore: OUT never appears
    /// partial (it is absent, or complete and equal to the disk).
    @Test(arguments: ["raw", "qcow2"])
    func killMinusNineDuringRestore(_ format: String) throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        var rng = SeededRandom(seed: format == "raw" ? 11 : 12)
        for _ in 0..<6 {
            let out = dir.file("out-\(UInt32.random(in: 0...UInt32.max, using: &rng)).\(format)")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try QBackupBinary.path())
            process.arguments = ["restore", repo, "--to", out, "--format", format]
            process.standardError = FileHandle.nullDevice
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            usleep(UInt32.random(in: 0...60_000, using: &rng))
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            if FileManager.default.fileExists(atPath: out) {
                try Tools.qemuImg("compare", "-q", "-F", format, disk, out)
            }
        }
    }

    /// flatten and create onto a full file system (a 4 MiB tmpfs): one error line, exit 1,
    /// no OUT and no temporary file left.
    @Test func fullFileSystemLeavesNothing() throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        let small = dir.file("small")
        try FileManager.default.createDirectory(atPath: small, withIntermediateDirectories: false)
        let mount = try Tools.run("mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", small])
        try #require(mount.status == 0, "this test mounts a tmpfs and must run as root: \(mount.stderr)")
        defer { _ = try? Tools.run("umount", [small]) }
        let out = "\(small)/out"
        let commands: [[String]] = [
            ["flatten", disk, out], ["flatten", disk, out, "--format", "raw"], ["restore", repo, "--to", out],
            ["restore", repo, "--to", out, "--format", "raw"],
            // A 1 PiB disk's L1 table is 16 MiB of zeros.
            ["create", out, "1P"],
        ]
        for command in commands {
            let result = try QBackupBinary.run(command)
            #expect(result.status == 1 && result.failedCleanly, "\(command): exit \(result.status): \(result.stderr)")
            #expect(result.stderr.contains("No space left"), "\(command): \(result.stderr)")
            #expect(Self.others(in: small, keep: []).isEmpty, "\(command): left \(Self.others(in: small, keep: []))")
        }
    }

    /// An existing OUT is refused without --force (and left alone); with --force it is replaced.
    @Test(arguments: writers + [["create", "OUT", "1M"], ["create", "OUT", "1M", "-f", "raw"]])
    func existingOutputNeedsForce(_ command: [String]) throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        let out = dir.file("out.img")
        let old = Data("the user's file".utf8)
        try old.write(to: URL(fileURLWithPath: out))
        let arguments = command.map { $0 == "REPO" ? repo : $0 == "DISK" ? disk : $0 == "OUT" ? out : $0 }
        let refused = try QBackupBinary.run(arguments)
        #expect(refused.status == 1 && refused.failedCleanly, "exit \(refused.status): \(refused.stderr)")
        #expect(refused.stderr.contains("--force"), "\(refused.stderr)")
        #expect(try Data.contents(of: out) == old)
        let forced = try QBackupBinary.run(arguments + ["--force"])
        #expect(forced.status == 0, "\(forced.stderr)")
        if command[0] == "create" {
            #expect(try Tools.run("qemu-img", ["info", out]).status == 0)
        } else {
            try Tools.qemuImg("compare", "-q", disk, out)
        }
        #expect(Self.others(in: dir.path, keep: ["disk.qcow2", "repo", "out.img"]).isEmpty)
    }

    /// A symbolic link at --to survives: refused without --force, and a forced restore that
    /// fails (a damaged layer) removes only its own temporary file.
    @Test func symlinkAtTheOutputSurvivesAFailedRestore() throws {
        let dir = TempDir()
        let (_, repo) = try Self.fixture(dir)
        let out = dir.file("out.img")
        #expect(symlink("/nonexistent/target", out) == 0)
        let refused = try QBackupBinary.run(["restore", repo, "--to", out])
        #expect(refused.failedCleanly, "\(refused.stderr)")
        let layer = try #require(Self.others(in: repo, keep: []).first { $0.hasPrefix("full-") && $0.hasSuffix(".qcow2") })
        // Cut the layer short: its data clusters now lie past the end of the file.
        try Tools.run("truncate", ["-s", "600K", "\(repo)/\(layer)"])
        let failed = try QBackupBinary.run(["restore", repo, "--to", out, "--force"])
        #expect(failed.failedCleanly, "exit \(failed.status): \(failed.stderr)")
        var st = stat()
        #expect(lstat(out, &st) == 0 && st.st_mode & S_IFMT == S_IFLNK, "the symbolic link was removed")
        #expect(Self.others(in: dir.path, keep: ["disk.qcow2", "repo", "out.img"]).isEmpty)
    }

    /// Issue 17 item 13: `restore --to -` writes the raw disk to stdout (a pipe), messages on
    /// stderr; it takes no --output json and no qcow2.
    @Test func restoreToStdoutIsTheRawDisk() throws {
        let dir = TempDir()
        let (disk, repo) = try Self.fixture(dir)
        let reference = dir.file("ref.raw")
        #expect(try QBackupBinary.run(["restore", repo, "--to", reference, "--format", "raw"]).status == 0)
        let piped = try QBackupBinary.run(["restore", repo, "--to", "-"])
        #expect(piped.status == 0, "\(piped.stderr)")
        #expect(piped.stdoutData == (try Data.contents(of: reference)), "stdout is not the raw disk (\(piped.stdoutData.count) bytes)")
        #expect(piped.stderr.hasPrefix("restored layer 0 ") && !piped.stderr.contains("error"), "\(piped.stderr)")
        let streamed = dir.file("streamed.raw")
        try piped.stdoutData.write(to: URL(fileURLWithPath: streamed))
        try Tools.qemuImg("compare", "-q", "-F", "qcow2", "-f", "raw", streamed, disk)
        // Through a shell pipe into sha256sum, as an admin would.
        let binary = try QBackupBinary.path()
        let sums = try Tools.run("/bin/bash", ["-c", "set -o pipefail; '\(binary)' restore '\(repo)' --to - -q | sha256sum; sha256sum < '\(reference)'"])
        let lines = sums.stdout.split(separator: "\n").map { $0.prefix(64) }
        #expect(sums.status == 0 && lines.count == 2 && lines[0] == lines[1], "\(sums.stdout) \(sums.stderr)")
        for extra in [["--output", "json"], ["--format", "qcow2"]] {
            let refused = try QBackupBinary.run(["restore", repo, "--to", "-"] + extra)
            #expect(refused.status == 2 && refused.stdout.isEmpty, "\(extra): \(refused.status) \(refused.stderr)")
        }
    }

    /// Issue 17 item 13: a block device (a loop device here) is written in place, every byte
    /// (the old contents do not show through the disk's holes), only with --force; the bytes
    /// past the disk's end are left alone; a device smaller than the disk is refused untouched.
    @Test func restoreToABlockDeviceWritesItInPlace() throws {
        let losetup = try Tools.which("losetup", hint: "util-linux")
        let dir = TempDir()
        let (_, repo) = try Self.fixture(dir)
        let reference = dir.file("ref.raw")
        #expect(try QBackupBinary.run(["restore", repo, "--to", reference, "--format", "raw"]).status == 0)
        let expected = try Data.contents(of: reference)
        func loop(_ name: String, size: Int) throws -> String {
            let backing = dir.file(name)
            try Data(repeating: 0xee, count: size).write(to: URL(fileURLWithPath: backing))
            let attached = try Tools.run(losetup, ["-f", "--show", backing])
            #expect(attached.status == 0, "losetup: \(attached.stderr)")
            return attached.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        }
        let device = try loop("big.img", size: 32 << 20)
        defer { _ = try? Tools.run(losetup, ["-d", device]) }
        let small = try loop("small.img", size: 16 << 20)
        defer { _ = try? Tools.run(losetup, ["-d", small]) }
        func contents(_ path: String, _ count: Int) throws -> Data {
            let handle = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
            defer { try? handle.close() }
            return try handle.read(upToCount: count) ?? Data()
        }

        let unforced = try QBackupBinary.run(["restore", repo, "--to", device])
        #expect(unforced.failedCleanly && unforced.stderr.contains("--force"), "\(unforced.stderr)")
        #expect(try contents(device, 32 << 20) == Data(repeating: 0xee, count: 32 << 20), "refused, yet written")

        let forced = try QBackupBinary.run(["restore", repo, "--to", device, "--force"])
        #expect(forced.status == 0, "\(forced.stderr)")
        let written = try contents(device, 32 << 20)
        #expect(written.prefix(expected.count) == expected, "the device does not hold the disk")
        #expect(written.suffix(from: expected.count) == Data(repeating: 0xee, count: (32 << 20) - expected.count),
                "bytes past the disk's end changed")
        // No temporary file beside the device, nor in the folder of its backing file.
        #expect(Self.others(in: dir.path, keep: ["disk.qcow2", "repo", "ref.raw", "big.img", "small.img"]).isEmpty)

        let tooSmall = try QBackupBinary.run(["restore", repo, "--to", small, "--force"])
        #expect(tooSmall.failedCleanly && tooSmall.stderr.contains("block device holds"), "\(tooSmall.stderr)")
        #expect(try contents(small, 16 << 20) == Data(repeating: 0xee, count: 16 << 20))
        let qcow2 = try QBackupBinary.run(["restore", repo, "--to", device, "--force", "--format", "qcow2"])
        #expect(qcow2.status == 2, "\(qcow2.stderr)")
        // The refusal says why and what to do instead (QEMU writes qcow2 onto a device).
        #expect(qcow2.stderr.contains("qbackup writes qcow2 only to a file")
                && qcow2.stderr.contains("qemu-img convert -O qcow2 \(repo)/LAYER \(device)"), "\(qcow2.stderr)")
        // ... and the advice holds: QEMU's qcow2 of the latest layer on the device reads as the disk.
        let listed = try JSONHelpers.parse(try QBackupBinary.run(["list", repo, "--output", "json"]).stdout) as? [String: Any]
        let latest = try #require((listed?["layers"] as? [[String: Any]])?.last?["file"] as? String)
        try Tools.qemuImg("convert", "-O", "qcow2", "\(repo)/\(latest)", device)
        try Tools.qemuImg("compare", "-f", "qcow2", "-F", "raw", device, reference)
        try Tools.qemuImg("check", device)
    }
}
