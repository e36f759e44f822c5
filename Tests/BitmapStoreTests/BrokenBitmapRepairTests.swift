import BitmapStore
import Foundation
import QCowImage
import Testing
import TestSupport

/// Beyond QEMU: an image with one broken bitmap (QEMU refuses to open it) is
/// still readable by qbackup, `check` reports the bitmap, and `check --repair all`
/// removes just that bitmap so QEMU opens the image again.
@Suite struct BrokenBitmapRepairTests {
    /// An image with bitmaps "good" and "bad", both dirty, and the table offset of "bad".
    static func makeImage(_ dir: TempDir) throws -> (path: String, badTable: UInt64) {
        let path = dir.file("img.qcow2")
        try Tools.qemuImg("create", "-q", "-f", "qcow2", path, "64M")
        try Tools.qemuImg("bitmap", "--add", path, "good")
        try Tools.qemuImg("bitmap", "--add", path, "bad")
        try Tools.qemuIO(path, format: "qcow2", ["write -P 7 0 1M", "write -P 8 30M 64k"])
        let image = try ImageOpener.open(path)
        defer { image.close() }
        let catalog = try BitmapCatalog(file: try #require(image as? QCowFile))
        let bad = try #require(catalog.entry(named: "bad"))
        return (path, bad.tableOffset)
    }

    @Test func cleanBitmapsCheckClean() throws {
        let dir = TempDir()
        let (path, _) = try Self.makeImage(dir)
        let result = try QBackupBinary.run(["check", path])
        #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    }

    @Test func repairAllRemovesOnlyTheBrokenBitmap() throws {
        let dir = TempDir()
        let (path, table) = try Self.makeImage(dir)
        try Tools.qemuImg("convert", "-O", "raw", path, dir.file("before.raw"))
        // A reserved bit (bit 1) in the first bitmap table entry of "bad".
        let entry = try peek(path, at: table, count: 8).reduce(0) { $0 << 8 | UInt64($1) }
        try poke(path, at: table, be(entry | 0x2))
        // QEMU refuses to open the image for writing now.
        #expect(try Tools.run("qemu-io", ["-c", "write 0 4k", path]).status != 0)
        // qbackup still reads the guest data and reports the bitmap.
        let flat = try QBackupBinary.run(["flatten", path, dir.file("ours.raw"), "--format", "raw"])
        #expect(flat.status == 0, "\(flat.stderr)")
        #expect(try Data.contents(of: dir.file("ours.raw")) == Data.contents(of: dir.file("before.raw")))
        let report = try QBackupBinary.run(["check", path])
        #expect(report.status == 2, "\(report.stdout)")
        #expect(report.stdout.contains("bad"), "\(report.stdout)")
        // Repair drops "bad" only; QEMU opens the image again and "good" still tracks.
        let repair = try QBackupBinary.run(["check", "--repair", "all", path])
        #expect(repair.status == 0, "\(repair.stdout)\(repair.stderr)")
        #expect(try Tools.run("qemu-img", ["check", path]).status == 0)
        let info = try JSONHelpers.parse(try Tools.qemuImg("info", "--output=json", path).stdout) as? [String: Any]
        let bitmaps = ((info?["format-specific"] as? [String: Any])?["data"] as? [String: Any])?["bitmaps"] as? [[String: Any]]
        #expect(bitmaps?.compactMap { $0["name"] as? String } == ["good"])
        try Tools.qemuIO(path, format: "qcow2", ["write -P 9 40M 4k"])
        let nbd = try QemuNBD(image: path, bitmap: "good", directory: dir)
        defer { nbd.stop() }
        let dirty = try nbd.dirtyMap(bitmap: "good").filter(\.dirty)
        #expect(dirty.contains { $0.start <= 40 << 20 && 40 << 20 < $0.start + $0.length })
    }
}
