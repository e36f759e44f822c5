import Foundation
import Testing
import TestSupport

/// Issue 17 item 15: scripts/fuzz-corpus.sh writes only into its output folder and its own
/// temporary folder — qemu-img opened the relative `data_file=data.raw` from the caller's
/// working directory, which left a stray data.raw at the repository root.
@Suite struct FuzzCorpusScriptTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    @Test func writesNothingIntoTheCallersFolder() throws {
        let cwd = TempDir("qbackup-corpus-cwd")
        let out = TempDir("qbackup-corpus-out")
        let script = Self.root.appendingPathComponent("scripts/fuzz-corpus.sh").path
        let result = try Tools.run("bash", [script, out.path], cwd: cwd.path,
                                   environment: ["QBACKUP": try QBackupBinary.path()])
        #expect(result.status == 0, "\(result.stderr)")
        let left = try FileManager.default.contentsOfDirectory(atPath: cwd.path)
        #expect(left.isEmpty, "fuzz-corpus.sh wrote into its caller's folder: \(left)")
        #expect(FileManager.default.fileExists(atPath: out.file("image/datafile.qcow2")))
    }
}
