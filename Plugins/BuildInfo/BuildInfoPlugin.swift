import Foundation
import PackagePlugin

/// Gives the `qbackup` target a generated `BuildInfo` (commit and build date for `--version`):
/// a prebuild command, so it runs on every build, from a clean clone or a tarball, without network.
@main
struct BuildInfoPlugin: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) throws -> [Command] {
        let package = context.package.directoryURL
        let output = context.pluginWorkDirectoryURL.appending(path: "Generated")
        var environment: [String: String] = [:]
        if let epoch = ProcessInfo.processInfo.environment["SOURCE_DATE_EPOCH"] {
            environment["SOURCE_DATE_EPOCH"] = epoch
        }
        return [
            .prebuildCommand(
                displayName: "Build info (commit, date) for qbackup --version",
                executable: URL(fileURLWithPath: "/bin/sh"),
                arguments: [package.appending(path: "scripts/build-info.sh").path, package.path, output.path],
                environment: environment,
                outputFilesDirectory: output
            ),
        ]
    }
}
