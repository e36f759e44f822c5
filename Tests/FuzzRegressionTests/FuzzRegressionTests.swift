import Foundation
import FuzzTargets
import Testing

/// Replays every input kept in `Fuzz/regressions/<target>/` (each one crashed,
/// hung or leaked once, or covers a path worth keeping) through the same entry
/// function the libFuzzer executable calls. A regression crashes this test.
@Suite struct FuzzRegressionTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fuzz/regressions")

    static func inputs(_ target: String) throws -> [URL] {
        let dir = root.appendingPathComponent(target)
        return try FileManager.default.contentsOfDirectory(at: dir, includingPropertiesForKeys: nil)
            .filter { !$0.lastPathComponent.hasPrefix(".") && $0.pathExtension != "md" }
            .sorted { $0.lastPathComponent < $1.lastPathComponent }
    }

    @Test func everyTargetHasARegressionFolder() throws {
        let folders = try FileManager.default.contentsOfDirectory(atPath: Self.root.path)
            .filter { !$0.hasPrefix(".") && !$0.hasSuffix(".md") }
        #expect(Set(folders) == Set(FuzzTargets.all.keys), "folders \(folders), targets \(FuzzTargets.all.keys.sorted())")
    }

    @Test(arguments: FuzzTargets.all.keys.sorted())
    func replay(_ target: String) throws {
        let run = try #require(FuzzTargets.all[target])
        let files = try Self.inputs(target)
        for file in files {
            let bytes = try Data(contentsOf: file)
            let started = Date()
            bytes.withUnsafeBytes { run($0) }
            let elapsed = Date().timeIntervalSince(started)
            // libFuzzer runs with -timeout=10; a debug build is slower, so allow more here.
            #expect(elapsed < 20, "\(target)/\(file.lastPathComponent) took \(elapsed) s")
        }
        // Empty, truncated and all-0xff inputs are the first things hostile input tries.
        for edge in [[UInt8](), [0x51, 0x46, 0x49, 0xfb], [UInt8](repeating: 0xff, count: 4096)] {
            edge.withUnsafeBytes { run($0) }
        }
    }
}
