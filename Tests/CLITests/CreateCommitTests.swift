import Foundation
import Testing
import TestSupport

/// `create` and `commit` through the CLI, with QEMU as the judge.
@Suite struct CreateCommitTests {
    @Test(arguments: [
        ["--cluster-size", "512"], ["--cluster-size", "2M", "--extended-l2"], ["--refcount-bits", "1"],
        ["--refcount-bits", "64", "--compression-type", "zstd"], ["--cluster-size", "64K", "--extended-l2"],
    ])
    func createdImagesAreCleanAndAsAsked(_ extra: [String]) throws {
        let dir = TempDir()
        let path = dir.file("new.qcow2")
        let out = try QBackupBinary.run(["create", path, "3G"] + extra)
        #expect(out.status == 0, "\(out.stderr)")
        #expect(try Tools.run("qemu-img", ["check", path]).status == 0)
        let info = try JSONHelpers.parse(try Tools.qemuImg("info", "--output=json", path).stdout) as? [String: Any]
        #expect(info?["virtual-size"] as? Int == 3 << 30)
        let data = (info?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
        if extra.contains("--extended-l2") { #expect(data?["extended-l2"] as? Bool == true) }
        if extra.contains("zstd") { #expect(data?["compression-type"] as? String == "zstd") }
        if let i = extra.firstIndex(of: "--refcount-bits") { #expect(data?["refcount-bits"] as? Int == Int(extra[i + 1])) }
        // QEMU writes into it fine.
        try Tools.qemuIO(path, format: "qcow2", ["write -P 5 1M 1M"])
        #expect(try Tools.run("qemu-img", ["check", path]).status == 0)
    }

    @Test func createWithBackingTakesItsSize() throws {
        let dir = TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", dir.file("base.qcow2"), "100M")
        let out = try QBackupBinary.run(["create", dir.file("top.qcow2"), "--backing", "base.qcow2"])
        #expect(out.status == 0, "\(out.stderr)")
        let info = try JSONHelpers.parse(try Tools.qemuImg("info", "--output=json", dir.file("top.qcow2")).stdout)
            as? [String: Any]
        #expect(info?["virtual-size"] as? Int == 100 << 20)
        #expect(info?["backing-filename"] as? String == "base.qcow2")
        #expect(info?["backing-filename-format"] as? String == "qcow2")
    }

    @Test func commitMatchesQemuImgCommit() throws {
        let dir = TempDir()
        for name in ["ours", "theirs"] {
            try Tools.qemuImg("create", "-q", "-f", "qcow2", dir.file("\(name)-base.qcow2"), "64M")
            try Tools.qemuIO(dir.file("\(name)-base.qcow2"), format: "qcow2", ["write -P 1 0 8M"])
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "\(name)-base.qcow2", "-F", "qcow2",
                              dir.file("\(name)-top.qcow2"))
            try Tools.qemuIO(dir.file("\(name)-top.qcow2"), format: "qcow2",
                             ["write -P 2 1M 3000", "write -z 4M 64k", "discard 6M 1M", "write -P 3 40M 2M"])
        }
        try Tools.qemuImg("convert", "-O", "raw", dir.file("ours-top.qcow2"), dir.file("expected.raw"))
        let out = try QBackupBinary.run(["commit", dir.file("ours-top.qcow2")])
        #expect(out.status == 0, "\(out.stderr)")
        try Tools.qemuImg("commit", "-q", "-d", dir.file("theirs-top.qcow2"))
        #expect(try Tools.run("qemu-img", ["compare", dir.file("ours-base.qcow2"), dir.file("theirs-base.qcow2")]).status == 0)
        #expect(try Tools.run("qemu-img", ["compare", dir.file("ours-base.qcow2"), dir.file("expected.raw")]).status == 0)
        #expect(try Tools.run("qemu-img", ["check", dir.file("ours-base.qcow2")]).status == 0)
    }

    /// A top image that keeps its guest data in an external data file: commit used to
    /// open it without the data file and wrote the top file's own bytes into the base.
    /// (data_file_raw is not allowed with a backing file.)
    @Test func commitOfAnImageWithAnExternalDataFile() throws {
        let dir = TempDir()
        for name in ["ours", "theirs"] {
            try Tools.qemuImg("create", "-q", "-f", "qcow2", dir.file("\(name)-base.qcow2"), "8M")
            try Tools.qemuIO(dir.file("\(name)-base.qcow2"), format: "qcow2", ["write -P 1 0 4M"])
            try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "\(name)-base.qcow2", "-F", "qcow2", "-o",
                              "data_file=\(dir.file("\(name)-top.data"))", dir.file("\(name)-top.qcow2"))
            try Tools.qemuIO(dir.file("\(name)-top.qcow2"), format: "qcow2",
                             ["write -P 0x22 0 64k", "write -P 0x33 1M 100k", "write -z 2M 64k"])
        }
        let out = try QBackupBinary.run(["commit", dir.file("ours-top.qcow2")])
        #expect(out.status == 0, "\(out.stderr)")
        try Tools.qemuImg("commit", "-q", "-d", dir.file("theirs-top.qcow2"))
        let base = dir.file("ours-base.qcow2")
        for (pattern, offset, length) in [("0x22", 0, 65536), ("0x33", 1 << 20, 102400), ("0", 2 << 20, 65536),
                                           ("1", 3 << 20, 65536)] {
            let read = try Tools.run("qemu-io", ["-f", "qcow2", "-c", "read -P \(pattern) \(offset) \(length)", base])
            #expect(read.status == 0 && !read.stdout.contains("Pattern verification failed"),
                    "read -P \(pattern) \(offset) \(length): \(read.stdout)")
        }
        #expect(try Tools.run("qemu-img", ["compare", base, dir.file("theirs-base.qcow2")]).status == 0)
        #expect(try Tools.run("qemu-img", ["check", base]).status == 0)
    }

    @Test func commitMarksTheBackingFilesEnabledBitmaps() throws {
        let dir = TempDir()
        let base = dir.file("base.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", base, "64M")
        try Tools.qemuImg("bitmap", "--add", base, "track")
        try Tools.qemuImg("bitmap", "--add", "--disable", base, "frozen")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", dir.file("top.qcow2"))
        try Tools.qemuIO(dir.file("top.qcow2"), format: "qcow2", ["write -P 3 5M 100k", "write -z 20M 64k"])
        let out = try QBackupBinary.run(["commit", dir.file("top.qcow2")])
        #expect(out.status == 0, "\(out.stderr)")
        #expect(try Tools.run("qemu-img", ["check", base]).status == 0)
        let nbd = try QemuNBD(image: base, bitmap: "track", directory: dir)
        let dirty = try nbd.dirtyMap(bitmap: "track").filter(\.dirty)
        nbd.stop()
        waitForImageLocksToClear(base)
        #expect(dirty.contains { $0.start <= 5 << 20 && (5 << 20) + 100 * 1024 <= $0.start + $0.length }, "\(dirty)")
        #expect(dirty.contains { $0.start <= 20 << 20 && (20 << 20) + 65536 <= $0.start + $0.length }, "\(dirty)")
        let frozen = try QemuNBD(image: base, bitmap: "frozen", directory: dir)
        defer { frozen.stop() }
        #expect(try frozen.dirtyMap(bitmap: "frozen").allSatisfy { !$0.dirty })
    }
}
