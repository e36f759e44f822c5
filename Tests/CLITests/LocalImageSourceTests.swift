import Foundation
import Testing
import TestSupport

#if canImport(Glibc)
import Glibc
#endif

/// A disk truncated by another process while `backup` copies it reads as zeros from the cut
/// on: backup notices the size change after the copy and fails without recording the layer
/// (the bitmap untouched), instead of recording zeros with exit 0 (issue 11, weak spots).
@Suite struct LocalImageSourceTests {
    @Test func aDiskTruncatedDuringTheBackupIsNotRecorded() throws {
        let dir = TempDir()
        let disk = dir.file("disk.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", disk, "128M")
        try Tools.qemuIO(disk, format: "qcow2", ["write -P 0x5c 0 120M"])
        let pristine = dir.file("pristine.qcow2")
        try FileManager.default.copyItem(atPath: disk, toPath: pristine)
        var caught = 0
        for attempt in 0..<4 where caught == 0 {
            try? FileManager.default.removeItem(atPath: disk)
            try FileManager.default.copyItem(atPath: pristine, toPath: disk)
            let repo = dir.file("repo-\(attempt)")
            let process = Process()
            process.executableURL = URL(fileURLWithPath: try QBackupBinary.path())
            process.arguments = ["backup", disk, "--repo", repo, "--bitmap", "nightly"]
            let err = Pipe()
            process.standardError = err
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            // Truncate as soon as the layer is being written.
            let deadline = Date().addingTimeInterval(30)
            while process.isRunning && Date() < deadline {
                let names = (try? FileManager.default.contentsOfDirectory(atPath: repo)) ?? []
                if names.contains(where: { $0.hasSuffix(".partial") }) {
                    #expect(truncate(disk, 4 << 20) == 0)
                    break
                }
                usleep(500)
            }
            let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            process.waitUntilExit()
            if process.terminationStatus == 0 {
                // Truncated too late to matter: what was recorded must be the disk as it was.
                let out = dir.file("restored-\(attempt).qcow2")
                #expect(try QBackupBinary.run(["restore", repo, "--to", out]).status == 0)
                try Tools.qemuImg("compare", "-q", pristine, out)
                continue
            }
            caught += 1
            #expect(process.terminationStatus == 1, "\(stderr)")
            #expect(stderr.contains("changed size"), "\(stderr)")
            let list = try JSONHelpers.parse(try QBackupBinary.run(["list", repo, "--output", "json"]).stdout) as? [String: Any]
            #expect((list?["layers"] as? [Any])?.isEmpty ?? true, "a layer was recorded")
        }
        #expect(caught > 0, "the truncation never landed during a copy")
    }
}
