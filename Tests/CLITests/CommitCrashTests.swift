import Foundation
import Testing
import TestSupport

/// `qbackup commit` killed (SIGKILL, via the QBACKUP_CRASH_AFTER seam) before
/// its Nth file write or fsync, for every N until it completes: the backing
/// file never has corruption (leaks allowed), `qbackup check --repair leaks`
/// makes it clean, and the top image is untouched.
@Suite struct CommitCrashTests {
    @Test func everyKillPointLeavesTheBackingFileRepairable() throws {
        let dir = TempDir()
        let pristine = TempDir()
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,refcount_bits=4",
                          pristine.file("base.qcow2"), "2M")
        try Tools.qemuIO(pristine.file("base.qcow2"), format: "qcow2", ["write -P 0xa1 0 600k", "write -P 0xa2 1M 100k"])
        try Tools.qemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=65536", "-b", "base.qcow2", "-F", "qcow2",
                          pristine.file("top.qcow2"), "2M")
        try Tools.qemuIO(pristine.file("top.qcow2"), format: "qcow2",
                         ["write -P 0xb1 100k 200k", "write -z 512k 64k", "write -P 0xb2 1500k 300k", "discard 1M 64k",
                          "write -P 0xb3 640k 4k", "write -P 0xb4 720k 70k", "write -z 832k 64k", "write -P 0xb5 1920k 8k",
                          "write -P 0xb6 1984k 64k"])
        try Tools.qemuImg("convert", "-O", "raw", pristine.file("top.qcow2"), pristine.file("expected.raw"))
        let topBytes = try Data.contents(of: pristine.file("top.qcow2"))

        var kills = 0
        var completed = false
        for n in 1...400 {
            for name in ["base.qcow2", "top.qcow2"] {
                try? FileManager.default.removeItem(atPath: dir.file(name))
                try FileManager.default.copyItem(atPath: pristine.file(name), toPath: dir.file(name))
            }
            let run = try QBackupBinary.run(["commit", dir.file("top.qcow2")], environment: ["QBACKUP_CRASH_AFTER": "\(n)"])
            #expect(try Data.contents(of: dir.file("top.qcow2")) == topBytes, "top changed (kill point \(n))")
            if run.status == 0 {
                completed = true
                try Tools.qemuImg("check", "-f", "qcow2", dir.file("base.qcow2"))
                try Tools.qemuImg("compare", "-q", "-F", "raw", dir.file("top.qcow2"), pristine.file("expected.raw"))
                break
            }
            #expect(run.status == SIGKILL, "kill point \(n): exit \(run.status): \(run.stderr)")
            kills += 1
            let check = try Tools.run("qemu-img", ["check", "-f", "qcow2", dir.file("base.qcow2")])
            #expect(check.status == 0 || check.status == 3, "kill point \(n): \(check.stdout)")
            if check.status == 3 {
                let repair = try QBackupBinary.run(["check", "--repair", "leaks", dir.file("base.qcow2")])
                #expect(repair.status == 0, "kill point \(n): repair exited \(repair.status): \(repair.stdout) \(repair.stderr)")
                let after = try Tools.run("qemu-img", ["check", "-f", "qcow2", dir.file("base.qcow2")])
                #expect(after.status == 0, "kill point \(n) after repair: \(after.stdout)")
            }
        }
        #expect(completed)
        #expect(kills > 20)
    }
}
