import Foundation
import QCowImage
import Testing
import TestSupport

/// QEMU and qbackup refuse to write an image the other holds for writing.
@Suite struct LockInteropTests {
    @Test func refusesAnImageQemuNbdHolds() throws {
        let dir = TempDir()
        let path = dir.file("busy.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "4M")
        try Tools.qemuIO(path, format: "qcow2", ["write -P 0x42 0 64k"])
        let before = try Data.contents(of: path)

        let server = Process()
        server.executableURL = URL(fileURLWithPath: try Tools.which("qemu-nbd"))
        server.arguments = ["-t", "-f", "qcow2", "-k", dir.file("nbd.sock"), path]
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()
        defer {
            // SIGKILL: a child spawned from a test thread inherits that thread's blocked signals (SIGTERM among them).
            kill(server.processIdentifier, SIGKILL)
            server.waitUntilExit()
        }
        // qemu-nbd takes its locks once it has opened the image and listens; on a loaded 2-core CI machine that
        // took longer than 5 s once, so wait up to 60 s (the loop ends at the first refusal, normally within 0.2 s).
        var error: QCowError?
        let deadline = Date().addingTimeInterval(60)
        while Date() < deadline {
            do {
                let image = try ImageOpener.open(path, writable: true)
                image.close()
                usleep(50_000)
            } catch let e as QCowError where e.code == .locked {
                error = e
                break
            }
        }
        let locked = try #require(error, "qemu-nbd never locked the image")
        #expect(locked.region == "image lock")
        #expect(locked.description.contains("lock"))
        // Refused before anything was written.
        #expect(try Data.contents(of: path) == before)
    }

    @Test func qemuIoRefusesWhileWeWrite() throws {
        let dir = TempDir()
        let path = dir.file("ours.qcow2")
        try QCowCreator.create(at: path, options: QCowCreateOptions(size: 4 << 20)).close()
        let image = try #require(try openWritableRetryingLock(path) as? QCowFile)
        defer { image.close() }
        let data = [UInt8](repeating: 7, count: 4096)
        try data.withUnsafeBytes { try image.write($0, at: 0) }
        let result = try Tools.run("qemu-io", ["-f", "qcow2", "-c", "write 0 4k", path])
        #expect(result.status != 0)
        #expect(result.stderr.contains("Failed to get \"write\" lock"), "qemu-io said: \(result.stderr)")
        // Reading alongside a writer is also refused by QEMU without force-share.
        let info = try Tools.run("qemu-img", ["info", path])
        #expect(info.status != 0)
        #expect(info.stderr.contains("lock"))
    }
}
